"""`just deploy-check`: renders every kustomize overlay under deploy/k8s/overlays with
`kubectl kustomize` and the Helm chart deploy/helm/model-loader with `helm template` (its defaults
and each ci/*-values.yaml, after `helm lint --strict`), validates every object against the
Kubernetes schemas (kubernetes-validate, offline, strict), and checks that the pieces of each render
agree with each other and with the server:

- every probe is a native gRPC probe on the gRPC container port; liveness asks the empty service,
  readiness and start-up ask modelloader.v1.ModelLoader;
- the container ports are the ports of MODEL_LOADER_LISTEN and MODEL_LOADER_METRICS_LISTEN in the
  ConfigMap the container reads, and the Service targets them;
- every MODEL_LOADER_* key of the ConfigMap is a flag of the server (its --help lists the variable);
- no credential (a token, secret, password or access key) is a ConfigMap key or a literal env value;
- terminationGracePeriodSeconds is above MODEL_LOADER_SHUTDOWN_GRACE;
- the attach socket (MODEL_LOADER_ATTACH_SOCKET) lies on an emptyDir the server mounts, and every
  other container of the pod (a consumer) mounts that same volume at the same path;
- the auth token file (MODEL_LOADER_AUTH_TOKEN_FILE) lies on a Secret volume the server mounts
  read-only, and a NetworkPolicy selects the pod and admits only the gRPC and metrics ports, each
  from named sources;
- object-store credentials come from a Secret the render includes (envFrom), shipped without values;
- every container runs as non-root with a read-only root filesystem, no privilege escalation and
  every capability dropped;
- a cuda device (cuda:N) has nvidia.com/gpu enough for it (N + 1); the gpu overlay and the chart's
  ci/gpu-values.yaml ask for one nvidia.com/gpu and load to cuda.

The chart's renders must also deploy what the overlays do: its defaults the cpu overlay, and
ci/NAME-values.yaml the overlay NAME: the same objects (kinds and names), ConfigMap, containers,
volumes and ports, leaving out what differs by design (labels and selectors, annotations, Secrets'
placeholder contents).

With --values or --set, only the chart is checked, rendered with those on top of its defaults (the
overlays, the ci values files and the comparison are left out): deploy/tests break a value that way.

Usage: python3 deploy/check.py [--k8s DIR] [--chart DIR] [--helm PATH] [--server PATH-TO-model-loader]
                               [--values FILE]... [--set KEY=VALUE]...
"""

import argparse
import copy
import os
import pathlib
import re
import subprocess
import sys

import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33.0"
READY_SERVICE = "modelloader.v1.ModelLoader"
# The release name that gives the chart's objects the overlays' names.
RELEASE = "model-loader"
# Names of credentials (HF_TOKEN, AWS_SECRET_ACCESS_KEY); a *_FILE variable names a file instead.
CREDENTIAL = re.compile(r"^(?!.*_FILE$).*(TOKEN|SECRET|PASSWORD|ACCESS_KEY)")


class RenderError(Exception):
    pass


def render(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RenderError(f"kubectl kustomize {overlay} failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def render_chart(helm, chart, values=(), sets=()):
    """`helm lint --strict`, then `helm template`, with the same values; both read the values
    schema."""
    args = [f"--kube-version={KUBERNETES_VERSION}"]
    for file in values:
        args += ["--values", str(file)]
    for item in sets:
        args += ["--set", item]
    try:
        lint = subprocess.run([helm, "lint", "--strict", str(chart), *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise RenderError(f"no helm at {helm!r}: scripts/helm-bin installs the pinned one and prints its path") from None
    if lint.returncode != 0:
        raise RenderError(f"helm lint failed:\n{lint.stdout}{lint.stderr}")
    out = subprocess.run([helm, "template", RELEASE, str(chart), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RenderError(f"helm template failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def port_of(address):
    match = re.fullmatch(r".*:(\d+)", address or "")
    return int(match.group(1)) if match else None


def seconds_of(duration):
    match = re.fullmatch(r"(\d+)(ms|s|m)?", duration.strip())
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2) or "s"
    return {"ms": value / 1000, "s": value, "m": value * 60}[unit]


def check_render(docs, server_env, gpu=False):
    """Every rule of the module's docstring on one render; `gpu` for the renders meant for GPU
    nodes (one nvidia.com/gpu, loads to cuda)."""
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    for kind in ["Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "PersistentVolumeClaim",
                 "PodDisruptionBudget", "NetworkPolicy"]:
        if kind not in by_kind:
            errors.append(f"no {kind}")
    if errors:
        return errors

    deployment = by_kind["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "model-loader")
    config_names = [s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s]
    configs = [c for c in by_kind["ConfigMap"] if c["metadata"]["name"] in config_names]
    if not configs:
        return [f"the container reads no ConfigMap of the render ({config_names})"]
    env = {}
    for config in configs:
        env.update(config.get("data", {}))

    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    grpc_port, metrics_port = port_of(env.get("MODEL_LOADER_LISTEN")), port_of(env.get("MODEL_LOADER_METRICS_LISTEN"))
    if ports.get("grpc") != grpc_port:
        errors.append(f"container port grpc {ports.get('grpc')} is not MODEL_LOADER_LISTEN's port {grpc_port}")
    if ports.get("metrics") != metrics_port:
        errors.append(f"container port metrics {ports.get('metrics')} is not MODEL_LOADER_METRICS_LISTEN's port {metrics_port}")
    for probe, service in [("livenessProbe", ""), ("readinessProbe", READY_SERVICE), ("startupProbe", READY_SERVICE)]:
        spec = container.get(probe)
        if not spec or "grpc" not in spec:
            errors.append(f"{probe} is not a gRPC probe")
            continue
        if spec["grpc"].get("port") != grpc_port:
            errors.append(f"{probe} asks port {spec['grpc'].get('port')}, the server listens on {grpc_port}")
        if spec["grpc"].get("service", "") != service:
            errors.append(f"{probe} asks service {spec['grpc'].get('service')!r}, not {service!r}")
    for service in by_kind["Service"]:
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if target not in ports and target not in ports.values():
                errors.append(f"Service port {port['name']} targets {target}, not a container port {ports}")

    grace = seconds_of(env.get("MODEL_LOADER_SHUTDOWN_GRACE", "10s"))
    if grace is None or pod.get("terminationGracePeriodSeconds", 30) <= grace:
        errors.append(f"terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds', 30)} is not above the shutdown grace {grace}")
    for key in env:
        if key.startswith("MODEL_LOADER_") and server_env is not None and key not in server_env:
            errors.append(f"ConfigMap key {key} is no flag of the server")
        if CREDENTIAL.search(key):
            errors.append(f"ConfigMap key {key} is a credential: ConfigMaps are not secret, use a Secret")
    for c in pod["containers"]:
        for var in c.get("env", []):
            if CREDENTIAL.search(var["name"]) and "value" in var:
                errors.append(f"container {c['name']}: env {var['name']} is a credential set as a literal value, not from a Secret")

    errors += check_attach(pod, container, env)
    errors += check_auth(pod, container, env, deployment, by_kind["NetworkPolicy"])
    errors += check_object_store(container, by_kind["Secret"])
    pod_security = pod.get("securityContext", {})
    for c in pod["containers"]:
        security = c.get("securityContext", {})
        if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
            errors.append(f"container {c['name']} may run as root")
        if security.get("readOnlyRootFilesystem") is not True:
            errors.append(f"container {c['name']}: the root filesystem is writable")
        if security.get("allowPrivilegeEscalation") is not False:
            errors.append(f"container {c['name']}: privilege escalation is allowed")
        if "ALL" not in security.get("capabilities", {}).get("drop", []):
            errors.append(f"container {c['name']}: capabilities are not all dropped")

    limits = container.get("resources", {}).get("limits", {})
    gpus = int(limits.get("nvidia.com/gpu", 0))
    device = re.fullmatch(r"cuda(?::(\d+))?", env.get("MODEL_LOADER_DEVICE", "cpu"))
    if device and gpus <= int(device.group(1) or 0):
        errors.append(f"MODEL_LOADER_DEVICE {env['MODEL_LOADER_DEVICE']} needs {int(device.group(1) or 0) + 1} nvidia.com/gpu, the limits give {gpus}")
    if gpu:
        if gpus != 1:
            errors.append("the gpu render does not ask for one nvidia.com/gpu")
        if not device:
            errors.append("the gpu render does not load to cuda")
    return errors


def check_attach(pod, server, env):
    """The attach socket's folder is an emptyDir the server mounts; every other container of the
    pod mounts the same volume at the same path, so it finds the socket."""
    socket = env.get("MODEL_LOADER_ATTACH_SOCKET")
    if not socket:
        return []
    folder = str(pathlib.PurePosixPath(socket).parent)
    mounts = {m["mountPath"]: m["name"] for m in server.get("volumeMounts", [])}
    volume = mounts.get(folder)
    if volume is None:
        return [f"the server mounts nothing at {folder}, the attach socket's folder"]
    kinds = {v["name"]: v for v in pod.get("volumes", [])}
    if "emptyDir" not in kinds.get(volume, {}):
        return [f"volume {volume} holding the attach socket is not an emptyDir"]
    errors = []
    for other in pod["containers"]:
        if other is server:
            continue
        theirs = {m["mountPath"]: m["name"] for m in other.get("volumeMounts", [])}
        if theirs.get(folder) != volume:
            errors.append(f"container {other['name']} does not mount volume {volume} at {folder}")
    return errors


def check_auth(pod, server, env, deployment, policies):
    """The token file is on a Secret volume mounted read-only; a NetworkPolicy selects the pod and
    lets in only its gRPC and metrics ports."""
    errors = []
    tokens = env.get("MODEL_LOADER_AUTH_TOKEN_FILE")
    if not tokens:
        errors.append("MODEL_LOADER_AUTH_TOKEN_FILE is not set: the gRPC service is open to anyone who reaches it")
    else:
        folder = str(pathlib.PurePosixPath(tokens).parent)
        mount = next((m for m in server.get("volumeMounts", []) if m["mountPath"] == folder), None)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        if mount is None or "secret" not in volumes.get(mount["name"], {}):
            errors.append(f"the auth token file's folder {folder} is not a Secret volume the server mounts")
        elif not mount.get("readOnly"):
            errors.append(f"the Secret at {folder} is mounted writable")
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    selecting = [p for p in policies
                 if all(labels.get(k) == v for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items())]
    if not selecting:
        errors.append("no NetworkPolicy selects the pod")
    allowed = {"grpc", "metrics"} | {p["containerPort"] for p in server.get("ports", []) if p["name"] in ("grpc", "metrics")}
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            # No `from` (or an empty one) admits every source.
            if not rule.get("from"):
                errors.append(f"NetworkPolicy {policy['metadata']['name']} admits every source to {[p.get('port') for p in rule.get('ports', [])]}")
            for port in rule.get("ports", [{"port": "any"}]):
                if port.get("port") not in allowed:
                    errors.append(f"NetworkPolicy {policy['metadata']['name']} admits port {port.get('port')}")
    return errors


def check_object_store(server, secrets):
    """Object-store credentials come from a Secret the render includes, which ships no values."""
    names = [s["secretRef"]["name"] for s in server.get("envFrom", []) if "secretRef" in s]
    rendered = {s["metadata"]["name"]: s for s in secrets}
    errors = [f"envFrom names the Secret {n}, which the render does not include" for n in names if n not in rendered]
    if not names:
        errors.append("no Secret gives the container its object-store credentials (envFrom secretRef)")
    for name in names:
        if rendered.get(name, {}).get("stringData") or rendered.get(name, {}).get("data"):
            errors.append(f"the Secret {name} ships credentials")
    return errors


def deployed(docs):
    """A render less what differs by design between the overlays and the chart: labels, selectors
    and annotations (Helm's own labels, the config checksum), Secrets' placeholder contents (the
    Secret rules check those); a container's runAsNonRoot counts whether it or its pod sets it."""
    out = {}
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        doc = copy.deepcopy(doc)
        doc.pop("metadata")
        spec = doc.get("spec", {})
        if kind == "Secret":
            doc = {"type": doc.get("type", "Opaque")}
        elif kind in ("Deployment", "PodDisruptionBudget", "Service"):
            spec.pop("selector", None)
        elif kind == "NetworkPolicy":
            spec.pop("podSelector", None)
        if kind == "Service":
            spec.setdefault("type", "ClusterIP")
        if kind == "Deployment":
            spec["template"].pop("metadata", None)
            pod = spec["template"]["spec"]
            non_root = pod.get("securityContext", {}).get("runAsNonRoot")
            for c in pod["containers"]:
                if non_root is not None:
                    c.setdefault("securityContext", {}).setdefault("runAsNonRoot", non_root)
            # By name, so that order does not count.
            pod["containers"] = {c["name"]: c for c in pod["containers"]}
            pod["volumes"] = {v["name"]: v for v in pod.get("volumes", [])}
        out[f"{kind}/{name}"] = doc
    return out


def differences(path, ours, theirs):
    """Where two parsed YAML trees differ, as `path: ours != theirs` lines."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [line for key in sorted(set(ours) | set(theirs), key=str)
                for line in differences(f"{path}.{key}", ours.get(key), theirs.get(key))]
    if ours != theirs:
        return [f"{path}: {ours!r} != {theirs!r}"]
    return []


def compare(chart_docs, overlay_docs, overlay):
    """The chart's render against the overlay it stands for."""
    ours, theirs = deployed(chart_docs), deployed(overlay_docs)
    errors = []
    if set(ours) != set(theirs):
        errors.append(f"objects differ from overlay {overlay}: only the chart {sorted(set(ours) - set(theirs))}, "
                      f"only the overlay {sorted(set(theirs) - set(ours))}")
    for key in sorted(set(ours) & set(theirs)):
        errors += [f"differs from overlay {overlay} at {line}" for line in differences(key, ours[key], theirs[key])]
    return errors


def server_env_names(server):
    if server is None:
        return None
    out = subprocess.run([server, "--help"], capture_output=True, text=True, check=True)
    return set(re.findall(r"env: (MODEL_LOADER_[A-Z_]+)", out.stdout))


def pinned_helm(repo):
    """$HELM, else the pinned helm scripts/helm-bin installs once per machine and prints."""
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    out = subprocess.run([str(repo / "scripts" / "helm-bin")], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"scripts/helm-bin could not install helm:\n{out.stderr}")
    return out.stdout.strip()


def main():
    here = pathlib.Path(__file__).parent
    parser = argparse.ArgumentParser()
    parser.add_argument("--k8s", default=str(here / "k8s"))
    parser.add_argument("--chart", default=str(here / "helm" / "model-loader"))
    parser.add_argument("--helm", help="the helm binary (default: $HELM, else the pinned one scripts/helm-bin installs)")
    parser.add_argument("--server", help="the model-loader binary, to check the ConfigMap's flags")
    parser.add_argument("--values", action="append", default=[], help="check only the chart, with this values file")
    parser.add_argument("--set", action="append", default=[], help="check only the chart, with this KEY=VALUE")
    args = parser.parse_args()
    server_env = server_env_names(args.server)
    chart = pathlib.Path(args.chart)
    if args.helm is None:
        args.helm = pinned_helm(here.parent)

    renders = []  # (name, render function, gpu rules?, overlay it stands for)
    if args.values or args.set:
        renders.append(("chart", lambda: render_chart(args.helm, chart, args.values, args.set), False, None))
    else:
        overlays = sorted(p for p in (pathlib.Path(args.k8s) / "overlays").iterdir() if p.is_dir())
        for overlay in overlays:
            renders.append((overlay.name, lambda o=overlay: render(o), overlay.name == "gpu", None))
        renders.append(("chart", lambda: render_chart(args.helm, chart), False, "cpu"))
        for values in sorted((chart / "ci").glob("*-values.yaml")):
            stem = values.name.removesuffix("-values.yaml")
            renders.append((f"chart {stem}", lambda v=values: render_chart(args.helm, chart, [v]), stem == "gpu", stem))

    failed = False
    rendered = {}
    for name, make, gpu, overlay in renders:
        try:
            docs = rendered[name] = make()
        except RenderError as e:
            print(f"{name}: {e}", file=sys.stderr)
            failed = True
            continue
        errors = check_render(docs, server_env, gpu)
        if overlay is not None:
            if overlay not in rendered:
                errors.append(f"no overlay {overlay} to compare with")
            else:
                errors += compare(docs, rendered[overlay], overlay)
        for error in errors:
            print(f"{name}: {error}", file=sys.stderr)
        failed |= bool(errors)
        if not errors:
            same = f", deploys what overlay {overlay} does" if overlay else ""
            print(f"{name}: {len(docs)} objects valid for Kubernetes {KUBERNETES_VERSION}, probes, ports and flags agree{same}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
