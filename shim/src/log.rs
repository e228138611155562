//! runc-compatible logging: `--log FILE` with `--log-format text|json`.
//!
//! Engines read runc's log to report why a command failed (containerd's
//! go-runc takes the last `"level":"error"` record of a JSON log), so the
//! records have runc's shape: `{"level":"error","msg":"...","time":"..."}`
//! in JSON, `time="..." level=error msg="..."` in text. Without `--log`,
//! records go to stderr. Events come from `tracing`; this layer only
//! formats them.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// Log record format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `time="..." level=... msg="..."`
    Text,
    /// One JSON object per line.
    Json,
}

/// Writes runc-shaped records to a file or stderr.
pub struct RuncLayer {
    out: Mutex<Box<dyn Write + Send>>,
    format: Format,
    max: Level,
}

impl RuncLayer {
    /// A layer writing records at `max` or more severe to `out`.
    pub fn new(out: Box<dyn Write + Send>, format: Format, max: Level) -> Self {
        RuncLayer {
            out: Mutex::new(out),
            format,
            max,
        }
    }
}

#[derive(Default)]
struct Message {
    msg: String,
    fields: String,
}

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.msg, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.msg.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}

fn level_name(l: &Level) -> &'static str {
    match *l {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// One record in `format`.
pub fn record(format: Format, level: &Level, msg: &str, time: &str) -> String {
    match format {
        Format::Json => {
            let v = serde_json::json!({ "level": level_name(level), "msg": msg, "time": time });
            format!("{v}\n")
        }
        Format::Text => format!(
            "time={:?} level={} msg={:?}\n",
            time,
            level_name(level),
            msg
        ),
    }
}

impl<S: Subscriber> Layer<S> for RuncLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = event.metadata().level();
        if *level > self.max {
            return;
        }
        let mut m = Message::default();
        event.record(&mut m);
        let msg = format!("{}{}", m.msg, m.fields);
        let line = record(
            self.format,
            level,
            &msg,
            &crate::state::rfc3339(std::time::SystemTime::now()),
        );
        if let Ok(mut out) = self.out.lock() {
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_have_runc_shape() {
        let j = record(Format::Json, &Level::ERROR, "boom \"x\"", "T");
        let v: serde_json::Value = serde_json::from_str(j.trim()).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "boom \"x\"");
        assert_eq!(v["time"], "T");
        let t = record(Format::Text, &Level::WARN, "a b", "T");
        assert_eq!(t, "time=\"T\" level=warning msg=\"a b\"\n");
    }
}
