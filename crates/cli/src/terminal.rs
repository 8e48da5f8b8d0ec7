//! What the terminal gets: colour and live bars only on a terminal with `NO_COLOR` unset, plain
//! lines otherwise (a pipe, a file, a script, `--json`).

use std::io::IsTerminal as _;

/// How output is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// One JSON object per line on stdout, in the proto's JSON mapping.
    Json,
    /// Plain lines, no colour, no cursor movement.
    Plain,
    /// Live bars and colour (stdout and stderr are terminals, `NO_COLOR` unset).
    Live,
}

impl Output {
    /// Chooses from `--json`, the environment and what stdout/stderr are.
    pub fn detect(json: bool) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let output = if json {
            Output::Json
        } else if !no_color && std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            Output::Live
        } else {
            Output::Plain
        };
        console::set_colors_enabled(output == Output::Live);
        console::set_colors_enabled_stderr(output == Output::Live);
        output
    }
}
