//! The command line (`model-loader load|ps|get|…`) against the real server binary: each
//! subcommand's output and exit code, `--json`, auth, an unreachable server, and under a real
//! pseudo-terminal the live bars, Ctrl-C's prompt and `watch`'s redraws.
use crate::path;

use std::{path::Path, process::Stdio};

use expectrl::{Eof, Expect as _, process::unix::WaitStatus, session::OsSession as Session};
use proto::v1 as pb;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tests::{
    WAIT,
    binary::{Binary, binary_path},
    connect, eventually, fixture, get_model, state_of,
};

const DEMO: &str = "demo/tiny-sd";

/// What one run of the command line printed, and its exit code.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// stdout's lines, each a JSON object.
    fn json(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object a line ({e}): {l}")))
            .collect()
    }

    /// The whitespace-separated fields of the stdout line that starts with `first`.
    fn row(&self, first: &str) -> Vec<String> {
        let line = self.stdout.lines().find(|l| l.split_whitespace().next() == Some(first));
        let line = line.unwrap_or_else(|| panic!("no line for {first}:\n{}", self.stdout));
        line.split_whitespace().map(str::to_owned).collect()
    }
}

/// Runs `model-loader ARGS` without a terminal against the server at `server` (bounded).
async fn cli_with(server: &str, args: &[&str], envs: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(binary_path());
    command.args(args).env("MODEL_LOADER_SERVER", server).env_remove("MODEL_LOADER_TOKEN").stdin(Stdio::null());
    for (k, v) in envs {
        command.env(k, v);
    }
    let output = tokio::time::timeout(WAIT, command.output()).await.expect("the command ends").expect("it runs");
    let run = Run {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert!(!run.stderr.contains("Status {") && !run.stderr.contains("panicked"), "a debug dump or a panic: {run:?}");
    run
}

async fn cli(server: &Binary, args: &[&str]) -> Run {
    cli_with(&format!("http://{}", server.addr), args, &[]).await
}

/// The real server on the repository's model root (the bundled demo), offline.
async fn demo_server() -> Binary {
    Binary::start_in(&fixture::repo_models_dir().join(".."), &["--offline"], &[]).await
}

/// `load` without a terminal prints one plain line per step and the bytes read, then LOADED
/// (exit 0); `ps`, `get`, `tensors --checksums`, `resources` show it; `unload` frees it; `cancel`
/// of a model not loading says so. Plain output has no escape sequences.
#[tokio::test]
async fn subcommands_print_tables_and_exit_zero() {
    let server = demo_server().await;
    let load = cli(&server, &["load", DEMO]).await;
    assert_eq!(load.code, 0, "{load:?}");
    for (step, message, _) in tests::STEPS {
        assert!(load.stdout.contains(&format!("step {step}/8 {message}")), "step {step}: {}", load.stdout);
    }
    assert!(load.stdout.contains("  read: ") && load.stdout.contains("  done: "), "{}", load.stdout);
    assert!(load.stdout.ends_with(&format!("{DEMO}: LOADED\n")), "{}", load.stdout);
    assert!(!load.stdout.contains('\x1b') && !load.stderr.contains('\x1b'), "escape sequences: {load:?}");

    let ps = cli(&server, &["ps"]).await;
    assert_eq!(ps.code, 0, "{ps:?}");
    assert_eq!(
        ps.stdout.lines().next().map(|l| l.split_whitespace().take(3).collect::<Vec<_>>()),
        Some(vec!["ID", "STATE", "STEP"])
    );
    let row = ps.row(DEMO);
    assert_eq!(row[1..4], ["LOADED", "8/8", "cpu"], "{}", ps.stdout);
    assert_eq!(row.last().map(String::as_str), Some("ago"), "last use: {}", ps.stdout);
    assert!(ps.stdout.contains(" local ") && ps.stdout.lines().count() == 2, "{}", ps.stdout);

    let get = cli(&server, &["get", DEMO]).await;
    assert_eq!(get.code, 0, "{get:?}");
    assert_eq!(get.row("state:"), ["state:", "LOADED"]);
    assert_eq!(get.row("sample"), ["sample", "size:", "32"]);

    let tensors = cli(&server, &["tensors", DEMO, "--checksums"]).await;
    assert_eq!(tensors.code, 0, "{tensors:?}");
    let rows: Vec<&str> = tensors.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 18, "{}", tensors.stdout);
    for row in rows {
        let sha = row.split_whitespace().last().expect("a sha256");
        assert!(sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()), "{row}");
        assert_eq!(row.split_whitespace().rev().nth(1), Some("cpu"), "the device before the checksum: {row}");
    }

    let resources = cli(&server, &["resources"]).await;
    assert_eq!(resources.code, 0, "{resources:?}");
    let cpu = resources.row("cpu");
    let bar = cpu.last().expect("a bar");
    // The demo is a few MiB of a budget of GiB: less than one cell of the bar.
    assert_eq!(bar, &format!("[{}]", ".".repeat(30)), "{}", resources.stdout);

    let unload = cli(&server, &["unload", DEMO]).await;
    assert_eq!((unload.code, unload.stdout.as_str()), (0, "demo/tiny-sd: UNLOADED\n"), "{unload:?}");
    assert_eq!(state_of(&mut connect(server.addr).await, DEMO).await, pb::ModelState::Unloaded);
    let again = cli(&server, &["unload", DEMO]).await;
    assert_eq!((again.code, again.stdout.as_str()), (0, "demo/tiny-sd: was not loaded\n"), "{again:?}");
    let cancel = cli(&server, &["cancel", DEMO]).await;
    assert_eq!((cancel.code, cancel.stdout.as_str()), (0, "demo/tiny-sd: was not loading\n"), "{cancel:?}");
    let ps = cli(&server, &["ps"]).await;
    assert_eq!(ps.stdout.lines().count(), 1, "only the header once nothing is loaded: {}", ps.stdout);
    assert!(cli(&server, &["ps", "--all"]).await.row(DEMO).contains(&"UNLOADED".to_owned()));
}

/// Errors are the server's message and kind on stderr with the exit code of their gRPC code
/// family: not found 3, failed precondition 4; bad flags are clap's usage error, 2.
#[tokio::test]
async fn errors_exit_with_their_code_family() {
    let server = demo_server().await;
    let missing = cli(&server, &["load", "no/such-model"]).await;
    assert_eq!(missing.code, 3, "{missing:?}");
    assert!(missing.stderr.starts_with("error: ") && missing.stderr.contains("[not_found]"), "{missing:?}");

    let not_loaded = cli(&server, &["tensors", DEMO]).await;
    assert_eq!(not_loaded.code, 4, "{not_loaded:?}");
    assert!(not_loaded.stderr.starts_with("error: ") && not_loaded.stderr.contains("[not_loaded]"), "{not_loaded:?}");

    let usage = cli(&server, &["load"]).await;
    assert_eq!(usage.code, 2, "{usage:?}");
    assert!(usage.stderr.contains("<MODEL_ID>"), "{usage:?}");
}

/// `--json` prints one object per line in the proto's JSON mapping (camelCase, enum names,
/// 64-bit numbers as strings), for the load's progress and every listing.
#[tokio::test]
async fn json_is_one_proto_object_per_line() {
    let server = demo_server().await;
    let load = cli(&server, &["load", DEMO, "--json"]).await;
    assert_eq!(load.code, 0, "{load:?}");
    let progress = load.json();
    let mut steps: Vec<u64> = progress.iter().map(|m| m["step"].as_u64().expect("a step")).collect();
    steps.dedup();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    let bytes = progress.iter().find(|m| m["bytesTotal"].is_string()).expect("byte progress");
    assert_eq!(bytes["phase"], "MODEL_LOAD_PHASE_LOADING", "{bytes}");

    let ps = cli(&server, &["ps", "--json"]).await.json();
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert_eq!((ps[0]["modelId"].as_str(), ps[0]["state"].as_str()), (Some(DEMO), Some("MODEL_STATE_LOADED")));
    assert!(ps[0]["weightBytes"].as_str().is_some_and(|b| b.parse::<u64>().is_ok_and(|b| b > 0)), "{}", ps[0]);

    let get = cli(&server, &["get", DEMO, "--json"]).await.json();
    assert_eq!((get.len(), get[0]["sampleSize"].as_u64()), (1, Some(32)), "{get:?}");
    let tensors = cli(&server, &["tensors", DEMO, "--json", "--checksums"]).await.json();
    assert_eq!(tensors.len(), 18);
    assert!(tensors.iter().all(|t| t["sha256"].as_str().is_some_and(|s| s.len() == 64) && t["shape"].is_array()));
    assert!(tensors.iter().all(|t| t["device"] == "cpu"), "{tensors:?}");
    let resources = cli(&server, &["resources", "--json"]).await.json();
    assert_eq!(resources[0]["name"], "cpu", "{resources:?}");
    let unload = cli(&server, &["unload", DEMO, "--json"]).await.json();
    assert_eq!(unload, [serde_json::json!({"modelId": DEMO, "wasLoaded": true})]);

    let missing = cli(&server, &["get", "nope", "--json"]).await;
    assert_eq!(missing.code, 3, "{missing:?}");
    let error: Value = serde_json::from_str(missing.stderr.trim()).expect("the error as JSON");
    assert_eq!(
        (error["error"]["code"].as_i64(), error["error"]["kind"].as_str()),
        (Some(5), Some("not_found")),
        "{error}"
    );
}

/// `files ID` lists a loaded model's small files (path, size, sha256 of the committed files),
/// `--json` one object per line; `files ID PATH` prints the file's bytes as they are; a path the
/// model does not have exits 3 (not found), a model not loaded 4.
#[tokio::test]
async fn files_lists_and_prints_a_models_small_files() {
    let server = demo_server().await;
    let not_loaded = cli(&server, &["files", DEMO]).await;
    assert_eq!(not_loaded.code, 4, "{not_loaded:?}");
    assert_eq!(cli(&server, &["load", DEMO]).await.code, 0);
    let dir = fixture::repo_models_dir().join(DEMO);
    let files = fixture::small_files(&dir).expect("the demo's files");
    assert_eq!(files.len(), 4, "{:?}", files.iter().map(|(p, _)| p).collect::<Vec<_>>());

    let table = cli(&server, &["files", DEMO]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert_eq!(
        table.stdout.lines().next().map(|l| l.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["PATH", "SIZE", "SHA256"])
    );
    for (path, content) in &files {
        let row = table.row(path);
        assert_eq!(row.last(), Some(&hex::encode(Sha256::digest(content))), "{path}: {row:?}");
    }
    let json = cli(&server, &["files", DEMO, "--json"]).await.json();
    let got: Vec<(String, String, String)> = json
        .iter()
        .map(|f| {
            let field = |k: &str| f[k].as_str().unwrap_or_else(|| panic!("{k} in {f}")).to_owned();
            (field("path"), field("sizeBytes"), field("sha256"))
        })
        .collect();
    let want: Vec<(String, String, String)> =
        files.iter().map(|(p, b)| (p.clone(), b.len().to_string(), hex::encode(Sha256::digest(b)))).collect();
    assert_eq!(got, want);

    for (path, content) in &files {
        let bytes = cli(&server, &["files", DEMO, path]).await;
        assert_eq!(bytes.code, 0, "{bytes:?}");
        assert!(bytes.stdout.as_bytes() == content.as_slice(), "{path}: the file's bytes as they are");
    }
    let missing = cli(&server, &["files", DEMO, "unet/diffusion_pytorch_model.safetensors"]).await;
    assert_eq!(missing.code, 3, "{missing:?}");
    assert!(missing.stderr.contains("[not_found]") && missing.stdout.is_empty(), "{missing:?}");
}

/// `completions SHELL` prints a script that knows the subcommands and their flags, and the man
/// pages (`just man`) are roff, one per subcommand; neither needs a server.
#[tokio::test]
async fn completions_and_the_man_page() {
    let nowhere = "http://127.0.0.1:1";
    let bash = cli_with(nowhere, &["completions", "bash"], &[]).await;
    assert_eq!(bash.code, 0, "{bash:?}");
    for word in ["model-loader", "tensors", "--checksums", "--server", "--token-file"] {
        assert!(bash.stdout.contains(word), "{word} in the bash completions");
    }
    let zsh = cli_with(nowhere, &["completions", "zsh"], &[]).await;
    assert!(zsh.code == 0 && zsh.stdout.starts_with("#compdef model-loader"), "{zsh:?}");
    let man = cli_with(nowhere, &["man"], &[]).await;
    assert_eq!(man.code, 0, "{man:?}");
    assert!(man.stdout.contains(".TH model-loader 1"), "{}", &man.stdout[..200.min(man.stdout.len())]);
    for sub in ["load", "ps", "watch", "resources", "completions"] {
        assert!(man.stdout.contains(&format!("model\\-loader\\-{sub}(1)")), "{sub} in the man page");
    }
}

/// Nothing listening: a sentence for people naming the address, exit code 9 (unavailable).
#[tokio::test]
async fn an_unreachable_server_is_said_plainly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a port").local_addr().expect("addr").port();
    let server = format!("http://127.0.0.1:{port}");
    let run = cli_with(&server, &["ps"], &[]).await;
    assert_eq!(run.code, 9, "{run:?}");
    assert!(run.stderr.starts_with(&format!("error: cannot reach the server at {server}: is it running?")), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
}

/// With --auth-token-file on the server, the token comes from --token, --token-file or
/// MODEL_LOADER_TOKEN; without one the command exits 8 (unauthenticated) with the server's word.
#[tokio::test]
async fn tokens_from_a_flag_a_file_or_the_environment() {
    let dir = tempfile::tempdir().expect("tmp");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "admin:cli-secret-1\n").expect("tokens");
    let token_file = dir.path().join("mine");
    std::fs::write(&token_file, "cli-secret-1\n").expect("token file");
    let root = fixture::repo_models_dir();
    let server = Binary::start(&["--model-root", path(&root), "--auth-token-file", path(&tokens)], &[]).await;
    let addr = format!("http://{}", server.addr);

    let refused = cli_with(&addr, &["ps"], &[]).await;
    assert_eq!(refused.code, 8, "{refused:?}");
    assert!(refused.stderr.contains("[unauthenticated]"), "{refused:?}");
    let wrong = cli_with(&addr, &["ps", "--token", "wrong"], &[]).await;
    assert_eq!(wrong.code, 8, "{wrong:?}");

    assert_eq!(cli_with(&addr, &["ps", "--token", "cli-secret-1"], &[]).await.code, 0);
    assert_eq!(cli_with(&addr, &["ps", "--token-file", path(&token_file)], &[]).await.code, 0);
    let from_env = cli_with(&addr, &["load", DEMO], &[("MODEL_LOADER_TOKEN", "cli-secret-1")]).await;
    assert_eq!(from_env.code, 0, "{from_env:?}");
}

/// The server's own flags and variables stay the server's: `serve` takes them like no
/// subcommand does, and a MODEL_LOADER_* variable meant for the server (even one it would refuse)
/// does not disturb a client subcommand.
#[tokio::test]
async fn server_variables_do_not_reach_client_subcommands() {
    let root = fixture::repo_models_dir();
    let mut command = tokio::process::Command::new(binary_path());
    command.args(["serve", "--listen", "127.0.0.1:0", "--model-root", path(&root)]);
    let mut server = Binary::spawn(command);
    server.addr = server.logged_addr("serving modelloader.v1.ModelLoader").await;

    let envs = [("MODEL_LOADER_LISTEN", "not an address"), ("MODEL_LOADER_MEMORY_BUDGET", "lots")];
    let ps = cli_with(&format!("http://{}", server.addr), &["ps", "--all"], &envs).await;
    assert_eq!(ps.code, 0, "{ps:?}");
    assert!(ps.row(DEMO).contains(&"UNLOADED".to_owned()), "{ps:?}");
    server.sigterm();
    assert!(server.wait_exit(WAIT).await.success());
}

/// `load` sends a device list, a placement and `--device-map` entries as the server takes them:
/// here, a server without CUDA refuses the GPUs (exit 4) and a device map for one device (exit 4),
/// each naming why; an entry that is not `PREFIX=DEVICE` is a usage error (exit 2).
#[tokio::test]
async fn load_takes_several_gpus_and_a_device_map() {
    let server = demo_server().await;
    let gpus = cli(&server, &["load", DEMO, "--device", "cuda:0,cuda:1", "--placement", "split"]).await;
    assert_eq!(gpus.code, 4, "{gpus:?}");
    assert!(gpus.stderr.contains("cuda:0 is not available"), "{gpus:?}");
    let one =
        cli(&server, &["load", DEMO, "--device", "cpu", "--device-map", "lm_head=cpu", "--device-map", "=cpu"]).await;
    assert_eq!(one.code, 4, "{one:?}");
    assert!(one.stderr.contains("a device map places a model over several devices"), "{one:?}");
    let usage = cli(&server, &["load", DEMO, "--device-map", "lm_head"]).await;
    assert_eq!(usage.code, 2, "{usage:?}");
    assert!(usage.stderr.contains("\"lm_head\" is not PREFIX=DEVICE"), "{usage:?}");
}

/// A model of one F32 tensor of 2^27 elements (512 MiB): converting it to BF16 in step 7 holds
/// its load long enough to interrupt it.
fn one_large_tensor(root: &Path) {
    fixture::single_file_model(&root.join("large"), &fixture::f32_tensors("w", 1, 1 << 27)).expect("fixture");
}

/// `cancel ID` stops a load in flight: the `load` following it ends with exit code 7
/// (cancelled) and the model is UNLOADED.
#[tokio::test]
async fn cancel_stops_a_load_in_flight() {
    let root = tempfile::tempdir().expect("tmp");
    one_large_tensor(root.path());
    let server = Binary::start(&["--model-root", path(root.path()), "--offline"], &[]).await;
    let addr = format!("http://{}", server.addr);
    let load = tokio::spawn({
        let addr = addr.clone();
        async move { cli_with(&addr, &["load", "large", "--dtype", "bf16"], &[]).await }
    });
    let mut client = connect(server.addr).await;
    eventually!(
        get_model(&mut client, "large").await.last_progress.is_some_and(|p| p.step == 7),
        "the load reaches step 7"
    );
    let cancel = cli_with(&addr, &["cancel", "large"], &[]).await;
    assert_eq!((cancel.code, cancel.stdout.as_str()), (0, "large: load cancelled\n"), "{cancel:?}");
    let load = load.await.expect("the load command");
    assert_eq!(load.code, 7, "{load:?}");
    assert!(load.stderr.contains("[cancelled]"), "{load:?}");
    assert_eq!(state_of(&mut client, "large").await, pb::ModelState::Unloaded);
}

/// `model-loader ARGS` under a pseudo-terminal of 120 columns, with colour allowed.
fn spawn_in_pty(server: &str, args: &[&str]) -> Session {
    let mut command = std::process::Command::new(binary_path());
    command.args(args).env("MODEL_LOADER_SERVER", server).env("TERM", "xterm-256color").env_remove("NO_COLOR");
    let mut session = Session::spawn(command).expect("spawn under a pty");
    session.get_process_mut().set_window_size(120, 40).expect("window size");
    session.set_expect_timeout(Some(WAIT));
    session
}

/// Everything the session prints until it exits, and its exit code.
fn rest_and_exit(session: &mut Session) -> (String, i32) {
    let rest = session.expect(Eof).expect("the command ends");
    let text = String::from_utf8_lossy(rest.as_bytes()).into_owned();
    match session.get_process().wait().expect("wait") {
        WaitStatus::Exited(_, code) => (text, code),
        other => panic!("did not exit: {other:?}\n{text}"),
    }
}

/// Under a terminal `load` draws a step line and a byte bar (bytes, rate, ETA) and reaches 8/8.
#[tokio::test(flavor = "multi_thread")]
async fn load_draws_bars_on_a_terminal() {
    let server = demo_server().await;
    let addr = format!("http://{}", server.addr);
    let (seen, code) = tokio::task::spawn_blocking(move || {
        let mut session = spawn_in_pty(&addr, &["load", DEMO]);
        let bar = session.expect("read").expect("a read bar");
        let mut seen = String::from_utf8_lossy(bar.before()).into_owned() + "read";
        let (rest, code) = rest_and_exit(&mut session);
        seen.push_str(&rest);
        (seen, code)
    })
    .await
    .expect("the pty session");
    std::fs::write(artifact("cli-load.txt"), &seen).expect("save the transcript");
    assert_eq!(code, 0, "{seen}");
    assert!(seen.contains("step 4/8 Loading model weights..."), "{seen}");
    assert!(seen.contains("step 8/8 Finalizing model..."), "{seen}");
    assert!(seen.contains("ETA") && seen.contains("MiB") && seen.contains('#'), "a byte bar: {seen}");
    assert!(seen.contains('\x1b'), "drawn live, with escape sequences: {seen}");
    assert!(seen.contains(&format!("{DEMO}: LOADED")), "{seen}");
}

/// Where a test leaves a file for people to read (target/test-artifacts).
fn artifact(name: &str) -> std::path::PathBuf {
    let dir = binary_path().parent().and_then(Path::parent).expect("target").join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir.join(name)
}

/// Ctrl-C during a load asks whether to cancel it or leave it running; `c` cancels: CANCELLED is
/// printed, the exit code is 7, and the model ends UNLOADED.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_asks_then_cancels_the_load() {
    let root = tempfile::tempdir().expect("tmp");
    one_large_tensor(root.path());
    let server = Binary::start(&["--model-root", path(root.path()), "--offline"], &[]).await;
    let addr = format!("http://{}", server.addr);
    let (seen, code) = tokio::task::spawn_blocking(move || {
        let mut session = spawn_in_pty(&addr, &["load", "large", "--dtype", "bf16"]);
        let mut seen = String::new();
        let mut expect = |session: &mut Session, what: &str| {
            let found = session.expect(what).unwrap_or_else(|e| panic!("{what:?}: {e}\n{seen}"));
            seen.push_str(&String::from_utf8_lossy(found.before()));
            seen.push_str(what);
        };
        expect(&mut session, "step 7/8");
        session.send([3u8]).expect("Ctrl-C");
        expect(&mut session, "cancel the load (c) or leave it running (l)? ");
        session.send_line("c").expect("answer c");
        expect(&mut session, "CANCELLED");
        let (rest, code) = rest_and_exit(&mut session);
        (seen + &rest, code)
    })
    .await
    .expect("the pty session");
    std::fs::write(artifact("cli-ctrl-c.txt"), &seen).expect("save the transcript");
    assert_eq!(code, 7, "{seen}");
    assert_eq!(state_of(&mut connect(server.addr).await, "large").await, pb::ModelState::Unloaded);
}

/// A second Ctrl-C at the prompt leaves at once with 130, and the load goes on to LOADED: a load
/// never depends on its caller.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_ctrl_c_leaves_the_load_running() {
    let root = tempfile::tempdir().expect("tmp");
    one_large_tensor(root.path());
    let server = Binary::start(&["--model-root", path(root.path()), "--offline"], &[]).await;
    let addr = format!("http://{}", server.addr);
    let code = tokio::task::spawn_blocking(move || {
        let mut session = spawn_in_pty(&addr, &["load", "large", "--dtype", "bf16"]);
        session.expect("step 7/8").expect("step 7");
        session.send([3u8]).expect("Ctrl-C");
        session.expect("leave it running (l)? ").expect("the prompt");
        session.send([3u8]).expect("Ctrl-C again");
        rest_and_exit(&mut session)
    })
    .await
    .expect("the pty session");
    assert_eq!(code.1, 130, "{}", code.0);
    assert!(code.0.contains("left: the load of large goes on"), "{}", code.0);
    let mut client = connect(server.addr).await;
    eventually!(state_of(&mut client, "large").await == pb::ModelState::Loaded, "the load ends LOADED");
}

/// `watch` on a terminal redraws its table in place (cursor up, clear line) as a load goes on,
/// and Ctrl-C leaves it with 130.
#[tokio::test(flavor = "multi_thread")]
async fn watch_redraws_in_place() {
    let server = demo_server().await;
    let addr = format!("http://{}", server.addr);
    let mut session = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            let mut session = spawn_in_pty(&addr, &["watch"]);
            session.expect("watching").expect("the first draw");
            session
        }
    })
    .await
    .expect("pty");
    assert_eq!(cli_with(&addr, &["load", DEMO], &[]).await.code, 0);
    let (seen, code) = tokio::task::spawn_blocking(move || {
        let found = session.expect(expectrl::Regex("LOADED +8/8")).expect("the table shows the load's end");
        let seen = String::from_utf8_lossy(found.as_bytes()).into_owned();
        session.send([3u8]).expect("Ctrl-C");
        let (rest, code) = rest_and_exit(&mut session);
        (seen + &rest, code)
    })
    .await
    .expect("pty");
    std::fs::write(artifact("cli-watch.txt"), &seen).expect("save the transcript");
    assert_eq!(code, 130, "{seen}");
    assert!(seen.contains("\x1b[2K") || seen.contains("\x1b[1A"), "redrawn in place: {seen:?}");
    assert!(seen.contains("watching"), "the whole table drawn again after the first draw: {seen:?}");
}

/// Without a terminal `watch` prints one plain line per change.
#[tokio::test]
async fn watch_prints_lines_without_a_terminal() {
    let server = demo_server().await;
    let addr = format!("http://{}", server.addr);
    let mut watch = tokio::process::Command::new(binary_path())
        .args(["watch", DEMO])
        .env("MODEL_LOADER_SERVER", &addr)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("watch");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(watch.stdout.take().expect("stdout")));
    let first = tokio::time::timeout(WAIT, lines.next_line()).await.expect("a snapshot").expect("read");
    assert_eq!(first.as_deref(), Some("demo/tiny-sd UNLOADED"));
    assert_eq!(cli_with(&addr, &["load", DEMO], &[]).await.code, 0);
    let mut seen = Vec::new();
    while !seen.last().is_some_and(|l: &String| l.starts_with("demo/tiny-sd LOADED cpu")) {
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("a line").expect("read");
        seen.push(line.unwrap_or_else(|| panic!("watch ended: {seen:?}")));
    }
    assert!(seen.iter().any(|l| l == "demo/tiny-sd step 8/8 Finalizing model..."), "{seen:?}");
    assert!(seen.iter().all(|l| !l.contains('\x1b')), "{seen:?}");
}

/// The command lines of the README's "Command line" section, in order.
fn readme_cli_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README");
    let section = readme.split_once("\n## Command line").expect("a Command line section").1;
    let block = section.split("```").nth(1).expect("a code block in the Command line section");
    block.lines().map(str::trim).filter(|l| l.starts_with("model-loader ")).map(str::to_owned).collect()
}

/// Every `model-loader …` line of the README's Command line section runs as written (`sh -c`,
/// the binary on the PATH, the server named by MODEL_LOADER_SERVER) and exits 0.
#[tokio::test]
async fn readme_cli_commands_work() {
    let server = demo_server().await;
    let lines = readme_cli_lines();
    assert!(lines.len() >= 7, "the README shows the subcommands: {lines:?}");
    let bin_dir = binary_path().parent().expect("the binary's folder").to_owned();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    for line in &lines {
        let mut command = tokio::process::Command::new("sh");
        command.args(["-c", line]).env("PATH", &path).env("MODEL_LOADER_SERVER", format!("http://{}", server.addr));
        let output =
            tokio::time::timeout(WAIT, command.stdin(Stdio::null()).output()).await.expect("ends").expect("runs");
        assert!(
            output.status.success(),
            "{line}: {:?}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
