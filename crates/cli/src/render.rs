//! Text for people: tables, sizes, states and memory bars, readable without colour.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use client::pb;
use comfy_table::{Table, presets::NOTHING};

/// A table with a header and no borders: columns separated by spaces.
pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(header.to_vec());
    table
}

/// A table's text, one line each, without the padding comfy-table puts at the ends.
pub fn lines(table: &Table) -> Vec<String> {
    table.lines().map(|l| l.trim_end().strip_prefix(' ').unwrap_or(l.trim_end()).to_owned()).collect()
}

/// `1.5 MiB`.
pub fn size(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// `LOADED` for `MODEL_STATE_LOADED`.
pub fn state(status: &pb::ModelStatus) -> &'static str {
    let name = status.state().as_str_name();
    name.strip_prefix("MODEL_STATE_").unwrap_or(name)
}

/// `hub` for `MODEL_SOURCE_HUB`, `-` when unknown.
pub fn source(status: &pb::ModelStatus) -> String {
    match status.source() {
        pb::ModelSource::Unspecified => "-".to_owned(),
        other => other.as_str_name().trim_start_matches("MODEL_SOURCE_").to_lowercase().replace('_', "-"),
    }
}

/// `4/8`, with the bytes of a step that moves them (`4/8 37%`), `-` before any load.
pub fn step(progress: Option<&pb::ModelLoadProgress>) -> String {
    let Some(p) = progress.filter(|p| p.step > 0) else { return "-".to_owned() };
    if p.bytes_total > 0 && p.bytes_done < p.bytes_total {
        format!("{}/{} {}%", p.step, p.total, p.bytes_done * 100 / p.bytes_total)
    } else {
        format!("{}/{}", p.step, p.total)
    }
}

/// `step 4/8 Loading model weights... (model.safetensors)`.
pub fn step_line(p: &pb::ModelLoadProgress) -> String {
    if p.detail.is_empty() {
        format!("step {}/{} {}", p.step, p.total, p.message)
    } else {
        format!("step {}/{} {} ({})", p.step, p.total, p.message, p.detail)
    }
}

/// How long ago a Unix time in milliseconds was (`12s ago`), `never` for 0.
pub fn ago(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".to_owned();
    }
    let then = UNIX_EPOCH + Duration::from_millis(unix_ms);
    let elapsed = SystemTime::now().duration_since(then).unwrap_or_default();
    format!("{} ago", humantime::format_duration(Duration::from_secs(elapsed.as_secs())))
}

/// `-` for an empty field.
fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

/// The `ps` table.
pub fn models(models: &[pb::ModelStatus]) -> Vec<String> {
    let mut t = table(&["ID", "STATE", "STEP", "DEVICE", "DTYPE", "SIZE", "SOURCE", "CLIENTS", "LAST USE"]);
    for m in models {
        t.add_row(vec![
            m.model_id.clone(),
            state(m).to_owned(),
            step(m.last_progress.as_ref()),
            or_dash(&m.device).to_owned(),
            or_dash(&m.dtype).to_owned(),
            if m.weight_bytes > 0 { size(m.weight_bytes) } else { "-".to_owned() },
            source(m),
            m.attached_clients.to_string(),
            ago(m.last_used_unix_ms),
        ]);
    }
    lines(&t)
}

/// `get`: one field a line.
pub fn model(m: &pb::ModelStatus) -> Vec<String> {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    let mut row = |key: &str, value: String| {
        t.add_row(vec![format!("{key}:"), value]);
    };
    row("id", m.model_id.clone());
    row("state", state(m).to_owned());
    if let Some(p) = m.last_progress.as_ref().filter(|p| p.step > 0) {
        row("step", step_line(p));
        if p.bytes_total > 0 {
            row("bytes", format!("{} of {}", size(p.bytes_done), size(p.bytes_total)));
        }
    }
    row("device", or_dash(&m.device).to_owned());
    row("dtype", or_dash(&m.dtype).to_owned());
    row("revision", or_dash(&m.revision).to_owned());
    row("source", source(m));
    row("weights", size(m.weight_bytes));
    row("metadata", size(m.metadata_bytes));
    row("sample size", m.sample_size.map_or_else(|| "-".to_owned(), |s| s.to_string()));
    row("clients", m.attached_clients.to_string());
    row("last use", ago(m.last_used_unix_ms));
    if !m.error.is_empty() {
        row("error", format!("{} [{}]", m.error, or_dash(&m.error_kind)));
    }
    if !m.unload_reason.is_empty() {
        row("unloaded", m.unload_reason.clone());
    }
    lines(&t)
}

/// Columns of a memory bar.
const BAR_WIDTH: u64 = 30;

/// `[###==.........]`: used (`#`) and reserved (`=`) of the budget, the rest free (`.`).
pub fn memory_bar(used: u64, reserved: u64, budget: u64) -> String {
    let budget = budget.max(1);
    let cells =
        |bytes: u64| (u128::from(bytes) * u128::from(BAR_WIDTH) / u128::from(budget)).min(u128::from(BAR_WIDTH));
    let used_cells = cells(used);
    let reserved_cells = cells(used.saturating_add(reserved)) - used_cells;
    let free_cells = u128::from(BAR_WIDTH) - used_cells - reserved_cells;
    let repeat = |c: &str, n: u128| c.repeat(usize::try_from(n).expect("at most BAR_WIDTH"));
    format!("[{}{}{}]", repeat("#", used_cells), repeat("=", reserved_cells), repeat(".", free_cells))
}

/// The `resources` table: per device, budget, used, reserved and free, with a bar.
pub fn resources(devices: &[pb::DeviceResources]) -> Vec<String> {
    let mut t = table(&["DEVICE", "BUDGET", "USED", "RESERVED", "FREE", "MODELS", "USED # / RESERVED = / FREE ."]);
    for d in devices {
        let free = d.budget_bytes.saturating_sub(d.used_bytes.saturating_add(d.reserved_bytes));
        t.add_row(vec![
            d.name.clone(),
            size(d.budget_bytes),
            size(d.used_bytes),
            size(d.reserved_bytes),
            size(free),
            d.models.len().to_string(),
            memory_bar(d.used_bytes, d.reserved_bytes, d.budget_bytes),
        ]);
    }
    lines(&t)
}

/// The `tensors` table; the checksum column only when asked for.
pub fn tensors(tensors: &[pb::TensorInfo], checksums: bool) -> Vec<String> {
    let mut header = vec!["NAME", "DTYPE", "SHAPE", "SIZE", "DEVICE"];
    if checksums {
        header.push("SHA256");
    }
    let mut t = table(&header);
    for tensor in tensors {
        let shape = tensor.shape.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
        let mut row = vec![
            tensor.name.clone(),
            tensor.dtype.clone(),
            format!("[{shape}]"),
            size(tensor.size_bytes),
            tensor.device.clone(),
        ];
        if checksums {
            row.push(tensor.sha256.clone());
        }
        t.add_row(row);
    }
    lines(&t)
}

/// The files table: path, size, sha256.
pub fn files(files: &[pb::ModelFile]) -> Vec<String> {
    let mut t = table(&["PATH", "SIZE", "SHA256"]);
    for f in files {
        t.add_row(vec![f.path.clone(), size(f.size_bytes), f.sha256.clone()]);
    }
    lines(&t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A memory bar shows used, reserved and free in proportion, always the same width.
    #[test]
    fn memory_bar_is_proportional() {
        assert_eq!(memory_bar(0, 0, 100), format!("[{}]", ".".repeat(30)));
        assert_eq!(memory_bar(50, 10, 100), format!("[{}{}{}]", "#".repeat(15), "=".repeat(3), ".".repeat(12)));
        assert_eq!(memory_bar(200, 50, 100), format!("[{}]", "#".repeat(30)));
        assert_eq!(memory_bar(0, 0, 0).len(), 32);
    }

    /// The ps table is aligned columns without borders, one model a line under a header.
    #[test]
    fn models_table_reads_without_colour() {
        let status = pb::ModelStatus {
            model_id: "demo/tiny-sd".into(),
            state: pb::ModelState::Loaded.into(),
            device: "cpu".into(),
            dtype: "F32".into(),
            weight_bytes: 2048,
            source: pb::ModelSource::Local.into(),
            last_progress: Some(pb::ModelLoadProgress { step: 8, total: 8, ..Default::default() }),
            ..Default::default()
        };
        let lines = models(&[status]);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("ID ") && lines[0].ends_with("LAST USE"), "{lines:?}");
        let fields: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(fields, ["demo/tiny-sd", "LOADED", "8/8", "cpu", "F32", "2.0", "KiB", "local", "0", "never"]);
        assert_eq!(lines[0].find("STATE"), lines[1].find("LOADED"), "aligned: {lines:?}");
    }
}
