//! The deployment check (`just deploy-check`, deploy/check.py) passes on the committed manifests
//! and fails on broken ones: it renders the overlays with `kubectl kustomize`, validates them
//! against the Kubernetes schemas, and checks probes, ports and flags against each other and the
//! server.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A copy of deploy/k8s in a temporary folder, to break.
fn copy_of_manifests() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("temp dir");
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("read dir") {
            let entry = entry.expect("entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("type").is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).expect("copy");
            }
        }
    }
    copy(&repo().join("deploy/k8s"), tmp.path());
    tmp
}

/// Runs the check on `k8s`: whether it passed, and what it printed.
fn check(k8s: &Path) -> (bool, String) {
    let output = std::process::Command::new("python3")
        .arg(repo().join("deploy/check.py"))
        .arg("--k8s")
        .arg(k8s)
        .arg("--server")
        .arg(tests::binary::binary_path())
        .output()
        .expect("run python3 deploy/check.py (pip install kubernetes-validate; kubectl on PATH)");
    let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("read");
    assert!(text.contains(from), "{} has {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).expect("write");
}

#[test]
fn the_committed_manifests_pass() {
    let (ok, text) = check(&repo().join("deploy/k8s"));
    assert!(ok, "{text}");
    for overlay in ["cpu", "cpu-consumer", "gpu"] {
        assert!(text.contains(&format!("{overlay}: 9 objects valid")), "{overlay}: {text}");
    }
}

/// Each breakage is caught, and named.
#[test]
fn broken_manifests_fail() {
    let breakages: [(&str, &str, &str, &str); 12] = [
        // A readiness probe on a port the server does not listen on.
        (
            "base/deployment.yaml",
            "            grpc:\n              port: 50051\n              service: modelloader",
            "            grpc:\n              port: 50052\n              service: modelloader",
            "readinessProbe asks port 50052",
        ),
        // The server told to listen elsewhere than the container port.
        ("base/configmap.yaml", "\"0.0.0.0:9090\"", "\"0.0.0.0:9091\"", "not MODEL_LOADER_METRICS_LISTEN's port 9091"),
        // A flag the server does not have.
        ("base/configmap.yaml", "MODEL_LOADER_EVICT:", "MODEL_LOADER_EVICTION:", "MODEL_LOADER_EVICTION is no flag"),
        // A field Kubernetes does not know (strict schema validation).
        ("base/service.yaml", "appProtocol: grpc", "appProtocoll: grpc", "appProtocoll"),
        // A kill before the server's shutdown grace is over.
        (
            "base/deployment.yaml",
            "terminationGracePeriodSeconds: 30",
            "terminationGracePeriodSeconds: 15",
            "terminationGracePeriodSeconds 15",
        ),
        // A GPU overlay without a GPU.
        (
            "overlays/gpu/deployment.yaml",
            "              nvidia.com/gpu: 1\n            limits:\n              memory: 64Gi\n              nvidia.com/gpu: 1",
            "            limits:\n              memory: 64Gi",
            "does not ask for one nvidia.com/gpu",
        ),
        // A consumer that does not mount the attach socket's volume.
        (
            "overlays/cpu-consumer/consumer.yaml",
            "            - name: attach\n              mountPath: /run/model-loader",
            "            - name: attach\n              mountPath: /run/elsewhere",
            "container consumer does not mount volume attach at /run/model-loader",
        ),
        // The attach socket on a folder no volume holds (the read-only root filesystem).
        (
            "base/configmap.yaml",
            "\"/run/model-loader/attach.sock\"",
            "\"/var/run/attach.sock\"",
            "the server mounts nothing at /var/run",
        ),
        // The token Secret mounted writable.
        (
            "base/deployment.yaml",
            "              mountPath: /etc/model-loader/auth\n              readOnly: true",
            "              mountPath: /etc/model-loader/auth",
            "mounted writable",
        ),
        // A NetworkPolicy that lets in another port.
        ("base/networkpolicy.yaml", "port: metrics", "port: 8080", "admits port 8080"),
        // Object-store credentials committed with the manifests.
        (
            "base/object-store-secret.yaml",
            "stringData: {}",
            "stringData:\n  AWS_SECRET_ACCESS_KEY: x",
            "ships credentials",
        ),
        // The container reading a credentials Secret nobody renders.
        (
            "base/deployment.yaml",
            "                name: model-loader-object-store",
            "                name: model-loader-s3",
            "names the Secret model-loader-s3",
        ),
    ];
    for (file, from, to, expected) in breakages {
        let k8s = copy_of_manifests();
        edit(&k8s.path().join(file), from, to);
        let (ok, text) = check(k8s.path());
        assert!(!ok, "{file}: {to:?} passed the check:\n{text}");
        assert!(text.contains(expected), "{file}: the check says {expected:?}:\n{text}");
    }
}
