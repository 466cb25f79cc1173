// pgjdbc (Debian's libpostgresql-jdbc-java) against Sundial, as DBeaver and Metabase use it:
// DatabaseMetaData (getSchemas, getTables, getColumns, getPrimaryKeys) and a PreparedStatement
// with a timestamp parameter run 10 times (pgjdbc prepares on the server after 5 runs and then
// reads results in binary). Run as: java -cp postgresql.jar JdbcClient.java HOST PORT DB
import java.sql.*;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.util.*;

public class JdbcClient {
    static void check(String label, Object actual, Object expected) {
        if (!Objects.equals(actual, expected)) {
            System.err.println(label + ": expected " + expected + ", got " + actual);
            System.exit(1);
        }
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/" + args[2] + "?user=sundial&ApplicationName=jdbc-test";
        try (Connection conn = DriverManager.getConnection(url)) {
            DatabaseMetaData meta = conn.getMetaData();
            check("product", meta.getDatabaseProductName(), "PostgreSQL");
            check("major version", meta.getDatabaseMajorVersion(), 16);

            List<String> schemas = new ArrayList<>();
            try (ResultSet rs = meta.getSchemas()) {
                while (rs.next()) schemas.add(rs.getString("TABLE_SCHEM"));
            }
            check("schemas include public", schemas.contains("public"), true);

            List<String> tables = new ArrayList<>();
            try (ResultSet rs = meta.getTables(null, "public", "%", new String[] {"TABLE"})) {
                while (rs.next()) tables.add(rs.getString("TABLE_NAME"));
            }
            check("tables", tables, List.of("cpu"));

            Map<String, String> columns = new LinkedHashMap<>();
            try (ResultSet rs = meta.getColumns(null, "public", "cpu", "%")) {
                while (rs.next()) columns.put(rs.getString("COLUMN_NAME"), rs.getString("TYPE_NAME") + "/" + rs.getInt("DATA_TYPE"));
            }
            check("columns", columns.toString(),
                "{host=text/12, region=text/12, usage=float8/8, n=int8/-5, ok=bool/-7, time=timestamptz/93}");

            try (ResultSet rs = meta.getPrimaryKeys(null, "public", "cpu")) {
                while (rs.next()) { /* Sundial declares no key constraints: an empty answer is right */ }
            }

            String sql = "SELECT host, usage, time FROM cpu WHERE time >= ? ORDER BY host";
            try (PreparedStatement ps = conn.prepareStatement(sql)) {
                for (int i = 0; i < 10; i++) {
                    ps.setObject(1, OffsetDateTime.of(2023, 11, 14, 22, 13, 25, 0, ZoneOffset.UTC));
                    try (ResultSet rs = ps.executeQuery()) {
                        check("row " + i, rs.next(), true);
                        check("host " + i, rs.getString(1), "b");
                        check("usage " + i, rs.getDouble(2), 2.5);
                        check("time " + i, rs.getObject(3, OffsetDateTime.class).toInstant().getEpochSecond(), 1700000010L);
                        check("one row " + i, rs.next(), false);
                    }
                }
            }
            try (Statement st = conn.createStatement()) {
                try {
                    st.executeQuery("SELECT * FROM no_such_table");
                    check("error expected", false, true);
                } catch (SQLException e) {
                    check("sqlstate", e.getSQLState(), "42P01");
                }
                try (ResultSet rs = st.executeQuery("SELECT count(*) FROM cpu")) {
                    rs.next();
                    check("count after error", rs.getLong(1), 2L);
                }
            }
        }
        System.out.println("jdbc client ok");
    }
}
