//! The log subscriber: text for terminals, JSON for clusters, a load's span fields on every line;
//! and beside it, with `--otlp-endpoint`, the layer that exports traces (`traces`).

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    EnvFilter, Layer as _,
    field::RecordFields,
    filter::{FilterExt as _, FilterFn},
    fmt::{
        FormatFields, FormattedFields,
        format::{DefaultFields, Writer},
    },
    layer::SubscriberExt as _,
    util::SubscriberInitExt as _,
};

use crate::{
    cli::LogFormat,
    traces::{self, OtlpConfig, Traces},
};

/// Installs the global subscriber: logs filtered by `RUST_LOG` (default `info`), JSON for
/// clusters; with `otlp`, traces exported there too (then call it within the tokio runtime, and
/// [`Traces::shutdown`] at the end). Spans for traces only never reach the logs.
pub fn init_tracing(format: LogFormat, otlp: Option<&OtlpConfig>) -> anyhow::Result<Option<Traces>> {
    use tracing_subscriber::fmt;
    let filter = || {
        let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        env.and(FilterFn::new(|meta| meta.target() != traces::TRACES))
    };
    let (trace_layer, traces) = match otlp {
        Some(config) => {
            let (layer, traces) = traces::layer::<tracing_subscriber::Registry>(config)?;
            (Some(layer), Some(traces))
        }
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(trace_layer);
    match format {
        LogFormat::Text => {
            use std::io::IsTerminal;
            let text = fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
                .fmt_fields(SpanFields)
                .with_filter(filter());
            registry.with(text).init();
        }
        LogFormat::Json => {
            let mut json = json_subscriber::JsonLayer::stderr();
            json.with_timer("timestamp", fmt::time::SystemTime);
            json.with_level("level");
            json.with_target("target");
            json.with_flattened_event();
            // The fields of the spans a line is in (a load's `model_id` and `step`) become
            // top-level fields, as log pipelines index them.
            json.with_top_level_flattened_span_list();
            registry.with(json.with_filter(filter())).init();
        }
    }
    if let Some(config) = otlp {
        tracing::info!(endpoint = %config.endpoint, service = %config.service_name, "exporting traces over OTLP/gRPC");
    }
    Ok(traces)
}

/// The text format's fields: tracing-subscriber's `DefaultFields` (without ANSI styling, so the
/// text can be edited), except that recording a field a span already shows replaces its value.
/// `DefaultFields` appends instead, so a load's span would read `load{model_id=m step=1 step=2 …}`
/// after a few steps; no crate offers the replacing behaviour.
struct SpanFields;

impl<'writer> FormatFields<'writer> for SpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut plain = String::new();
        DefaultFields::new().format_fields(Writer::new(&mut plain), fields)?;
        writer.write_str(&plain)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut added = Values(Vec::new());
        fields.record(&mut added);
        for (name, value) in added.0 {
            replace_or_append(&mut current.fields, name, &value);
        }
        Ok(())
    }
}

/// A record's fields as `DefaultFields` prints their values (`Debug`).
struct Values(Vec<(&'static str, String)>);

impl Visit for Values {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.push((field.name(), format!("{value:?}")));
    }
}

/// Sets `name=value` in `fields` (`a=1 b=2`, as `DefaultFields` writes them): replaces the value of
/// an existing `name=` that starts a field, when both values are one word; else appends.
fn replace_or_append(fields: &mut String, name: &str, value: &str) {
    let key = format!("{name}=");
    let start = fields.match_indices(&key).map(|(at, _)| at).find(|&at| at == 0 || fields.as_bytes()[at - 1] == b' ');
    if let Some(at) = start.filter(|_| !value.contains(' ')) {
        let value_start = at + key.len();
        let value_end = fields[value_start..].find(' ').map_or(fields.len(), |n| value_start + n);
        if !fields[value_start..value_end].contains('"') {
            fields.replace_range(value_start..value_end, value);
            return;
        }
    }
    if !fields.is_empty() {
        fields.push(' ');
    }
    fields.push_str(&key);
    fields.push_str(value);
}

#[cfg(test)]
mod tests {
    use super::replace_or_append;

    /// A recorded field replaces its earlier value in place; a new one is appended; a name that
    /// only ends another field's name, or values of several words, are left alone.
    #[test]
    fn recording_replaces_a_field_once_shown() {
        let mut fields = String::from("model_id=moe");
        replace_or_append(&mut fields, "step", "1");
        assert_eq!(fields, "model_id=moe step=1");
        replace_or_append(&mut fields, "step", "2");
        replace_or_append(&mut fields, "step", "3");
        assert_eq!(fields, "model_id=moe step=3");
        let mut fields = String::from("first_step=4 step=1 x=\"a b\"");
        replace_or_append(&mut fields, "step", "5");
        assert_eq!(fields, "first_step=4 step=5 x=\"a b\"");
        replace_or_append(&mut fields, "x", "\"c\"");
        assert_eq!(fields, "first_step=4 step=5 x=\"a b\" x=\"c\"");
    }
}
