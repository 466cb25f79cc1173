//! Tag filters applied to buffered rows before DataFusion sees them. `tag = 'v'` and
//! `tag IN (…)` are decided once per dictionary value rather than per row; in batches sorted
//! by series (`buffer::sort`) the first tag's rows are found by binary search. The survivors of
//! all batches are gathered into a few batches with `interleave`, which keeps only the
//! dictionary values they use. DataFusion still applies every filter afterwards.

use std::ops::Range;

use arrow::array::{Array, AsArray, StringArray};
use arrow::datatypes::{Int32Type, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};

use crate::buffer::{adapt, sort};

/// A tag and the values it may take.
pub type TagFilter = (String, Vec<String>);

/// Tag filters a buffered batch can apply through its dictionary: `tag = 'v'` and
/// `tag IN ('v', …)`, as (tag, accepted values).
pub fn tag_filters(filters: &[Expr], table: &crate::catalog::TableSchema) -> Vec<TagFilter> {
    let is_tag =
        |name: &str| table.column(name).is_some_and(|c| c.kind == crate::catalog::ColumnKind::Tag);
    let text = |e: &Expr| match e {
        Expr::Literal(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::Utf8View(Some(s))
            | ScalarValue::LargeUtf8(Some(s)),
            _,
        ) => Some(s.clone()),
        Expr::Literal(ScalarValue::Dictionary(_, inner), _) => match inner.as_ref() {
            ScalarValue::Utf8(Some(s)) => Some(s.clone()),
            _ => None,
        },
        Expr::Cast(cast) => match cast.expr.as_ref() {
            Expr::Literal(ScalarValue::Utf8(Some(s)), _) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    };
    let column = |e: &Expr| match e {
        Expr::Column(c) if is_tag(&c.name) => Some(c.name.clone()),
        Expr::Cast(cast) => match cast.expr.as_ref() {
            Expr::Column(c) if is_tag(&c.name) => Some(c.name.clone()),
            _ => None,
        },
        _ => None,
    };
    let mut out = Vec::new();
    for filter in filters {
        match filter {
            Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) => {
                let pair = match (column(left), text(right)) {
                    (Some(c), Some(v)) => Some((c, v)),
                    _ => column(right).zip(text(left)),
                };
                if let Some((c, v)) = pair {
                    out.push((c, vec![v]));
                }
            }
            Expr::InList(list) if !list.negated => {
                let values: Option<Vec<String>> = list.list.iter().map(text).collect();
                if let (Some(c), Some(values)) = (column(&list.expr), values) {
                    out.push((c, values));
                }
            }
            _ => {}
        }
    }
    out
}

/// Which values of a dictionary a filter accepts, remembered for the last dictionary seen:
/// writers tend to send the same series in the same order, so consecutive batches often have
/// equal dictionaries, and comparing two is one `memcmp`.
#[derive(Default)]
struct Wanted {
    last: Option<(StringArray, Vec<bool>)>,
}

impl Wanted {
    fn of(&mut self, strings: &StringArray, values: &[String]) -> &[bool] {
        let same = self.last.as_ref().is_some_and(|(last, _)| {
            last.len() == strings.len()
                && last.value_offsets() == strings.value_offsets()
                && last.value_data() == strings.value_data()
        });
        if !same {
            let wanted = (0..strings.len())
                .map(|i| strings.is_valid(i) && values.iter().any(|v| v == strings.value(i)))
                .collect();
            self.last = Some((strings.clone(), wanted));
        }
        &self.last.as_ref().expect("set above").1
    }
}

/// The rows of `batch` that can pass every filter, ascending.
fn rows(batch: &RecordBatch, filters: &[TagFilter], wanted: &mut [Wanted]) -> Vec<u32> {
    let sorted = filters
        .iter()
        .enumerate()
        .find_map(|(i, (tag, values))| Some((i, sort::ranges_of(batch, tag, values)?)));
    let (mut rows, done): (Option<Vec<u32>>, Option<usize>) = match sorted {
        Some((i, ranges)) => (
            Some(
                ranges
                    .into_iter()
                    .flat_map(|r: Range<usize>| r.start as u32..r.end as u32)
                    .collect(),
            ),
            Some(i),
        ),
        None => (None, None),
    };
    for (i, (tag, values)) in filters.iter().enumerate() {
        if Some(i) == done {
            continue;
        }
        let Some(column) = batch.column_by_name(tag) else { return Vec::new() };
        let Some(dictionary) = column.as_dictionary_opt::<Int32Type>() else { continue };
        let Some(strings) = dictionary.values().as_string_opt::<i32>() else { continue };
        let wanted = wanted[i].of(strings, values);
        if !wanted.iter().any(|w| *w) {
            return Vec::new();
        }
        let keys = dictionary.keys();
        let pass = |r: u32| keys.is_valid(r as usize) && wanted[keys.value(r as usize) as usize];
        rows = Some(match rows {
            Some(mut rows) => {
                rows.retain(|&r| pass(r));
                rows
            }
            None => (0..batch.num_rows() as u32).filter(|&r| pass(r)).collect(),
        });
    }
    rows.unwrap_or_else(|| (0..batch.num_rows() as u32).collect())
}

/// The rows of `batches` that can pass `filters` (not empty), as at most `groups` batches of
/// `schema`.
pub fn select(
    batches: &[&RecordBatch],
    filters: &[TagFilter],
    schema: &SchemaRef,
    groups: usize,
) -> Result<Vec<RecordBatch>, ArrowError> {
    let mut wanted: Vec<Wanted> = filters.iter().map(|_| Wanted::default()).collect();
    let mut picked: Vec<(RecordBatch, Vec<u32>)> = Vec::new();
    for batch in batches {
        let rows = rows(batch, filters, &mut wanted);
        if !rows.is_empty() {
            picked.push((adapt(batch, schema), rows));
        }
    }
    let total: usize = picked.iter().map(|(_, r)| r.len()).sum();
    let per_group = total.div_ceil(groups.max(1)).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < picked.len() {
        // Whole batches per group, about the same number of rows in each.
        let mut end = start;
        let mut rows = 0;
        while end < picked.len() && (rows == 0 || rows + picked[end].1.len() <= per_group) {
            rows += picked[end].1.len();
            end += 1;
        }
        let group = &picked[start..end];
        let picks: Vec<(usize, usize)> = group
            .iter()
            .enumerate()
            .flat_map(|(b, (_, rows))| rows.iter().map(move |&r| (b, r as usize)))
            .collect();
        let columns = (0..schema.fields().len())
            .map(|c| {
                let parts: Vec<&dyn Array> =
                    group.iter().map(|(batch, _)| batch.column(c).as_ref()).collect();
                arrow::compute::interleave(&parts, &picks)
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push(RecordBatch::try_new(schema.clone(), columns)?);
        start = end;
    }
    Ok(out)
}
