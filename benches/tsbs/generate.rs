//! The TSBS "cpu-only" data set as line protocol: measurement `cpu`, ten tags per host, ten
//! integer usage fields doing a bounded random walk, one row per host every 10 s, in time order
//! (every host at one instant, then the next instant), from 2016-01-01T00:00:00Z.

pub const START_NS: i64 = 1_451_606_400_000_000_000;
pub const INTERVAL_NS: i64 = 10_000_000_000;

const REGIONS: [&str; 9] = [
    "us-east-1",
    "us-west-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-northeast-1",
    "sa-east-1",
];
const OS: [&str; 3] = ["Ubuntu16.10", "Ubuntu16.04LTS", "Ubuntu15.10"];
const ARCH: [&str; 2] = ["x64", "x86"];
const TEAM: [&str; 4] = ["SF", "NYC", "LON", "CHI"];
const ENVIRONMENT: [&str; 3] = ["production", "staging", "test"];
pub const FIELDS: [&str; 10] = [
    "usage_user",
    "usage_system",
    "usage_idle",
    "usage_nice",
    "usage_iowait",
    "usage_irq",
    "usage_softirq",
    "usage_steal",
    "usage_guest",
    "usage_guest_nice",
];

/// Produces the data set in batches of whole lines.
pub struct Generator {
    series: Vec<String>,
    values: Vec<[i64; 10]>,
    rng: fastrand::Rng,
    time_ns: i64,
    end_ns: i64,
    host: usize,
}

impl Generator {
    /// `hosts` hosts from `START_NS` for `duration_s` seconds, seeded for repeatability.
    pub fn new(hosts: usize, duration_s: i64, seed: u64) -> Generator {
        let mut rng = fastrand::Rng::with_seed(seed);
        let series = (0..hosts)
            .map(|h| {
                let region = REGIONS[rng.usize(..REGIONS.len())];
                format!(
                    "cpu,hostname=host_{h},region={region},datacenter={region}{},rack={},os={},arch={},team={},service={},service_version={},service_environment={}",
                    (b'a' + rng.u8(0..3)) as char,
                    rng.u32(0..100),
                    OS[rng.usize(..OS.len())],
                    ARCH[rng.usize(..ARCH.len())],
                    TEAM[rng.usize(..TEAM.len())],
                    rng.u32(0..20),
                    rng.u32(0..2),
                    ENVIRONMENT[rng.usize(..ENVIRONMENT.len())],
                )
            })
            .collect();
        let values = (0..hosts).map(|_| std::array::from_fn(|_| rng.i64(0..=100))).collect();
        Generator {
            series,
            values,
            rng,
            time_ns: START_NS,
            end_ns: START_NS + duration_s * 1_000_000_000,
            host: 0,
        }
    }

    pub fn total_rows(hosts: usize, duration_s: i64) -> u64 {
        hosts as u64 * (duration_s * 1_000_000_000 / INTERVAL_NS) as u64
    }

    /// The next batch of at most `lines` lines, or `None` when the data set is done.
    pub fn next_batch(&mut self, lines: usize) -> Option<(String, usize)> {
        use std::fmt::Write;
        if self.time_ns >= self.end_ns {
            return None;
        }
        let mut out = String::with_capacity(lines * 330);
        let mut n = 0;
        while n < lines && self.time_ns < self.end_ns {
            let h = self.host;
            out.push_str(&self.series[h]);
            for (i, field) in FIELDS.iter().enumerate() {
                let v = &mut self.values[h][i];
                *v = (*v + self.rng.i64(-5..=5)).clamp(0, 100);
                let _ = write!(out, "{}{field}={}i", if i == 0 { ' ' } else { ',' }, *v);
            }
            let _ = writeln!(out, " {}", self.time_ns);
            n += 1;
            self.host += 1;
            if self.host == self.series.len() {
                self.host = 0;
                self.time_ns += INTERVAL_NS;
            }
        }
        Some((out, n))
    }
}
