//! The launcher's own log lines in torch's layout, so that what users and
//! tools read from torchrun's stderr reads the same:
//! `W1126 09:24:14.598000 9125 torchrun-rs] message`, on every line of a
//! multi-line message.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

pub struct TorchFormat;

fn now_local() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // SAFETY: localtime_r fills the local struct.
    let tm = unsafe {
        let t = now.as_secs() as libc::time_t;
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        tm
    };
    format!(
        "{:02}{:02} {:02}:{:02}:{:02}.{:06}",
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        now.subsec_micros()
    )
}

impl<S, N> FormatEvent<S, N> for TorchFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let letter = match *event.metadata().level() {
            Level::ERROR => 'E',
            Level::WARN => 'W',
            Level::INFO => 'I',
            Level::DEBUG | Level::TRACE => 'D',
        };
        let prefix = format!(
            "{letter}{} {} torchrun-rs] ",
            now_local(),
            std::process::id()
        );
        let mut msg = String::new();
        ctx.field_format()
            .format_fields(Writer::new(&mut msg), event)?;
        // As Python's logging with torch's formatter: every line of a
        // multi-line message carries the prefix.
        for line in msg.split('\n') {
            writeln!(w, "{prefix}{line}")?;
        }
        Ok(())
    }
}
