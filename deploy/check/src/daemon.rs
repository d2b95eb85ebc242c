//! The one place this crate reaches into iamlinkd: the config parser the daemon runs with (so the
//! ConfigMap is checked by the code that will read it), its list of config keys (so the chart is
//! checked to reach every one) and the metrics it exports (so the dashboard is checked against
//! the real names). If iamlinkd's modules move, only this file changes.

pub use iamlinkd::config::{keys, Config, MetricsListen};
pub use iamlinkd::metrics::Metrics;
