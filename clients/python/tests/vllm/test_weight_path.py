"""The plugin's weight path, in this process: vLLM's model built on the CPU, its load_weights fed
by the plugin from the real server through attach, every raw parameter (before
process_weights_after_loading, which on the CPU build moves linear weights into oneDNN handles)
equal to what vLLM's own DefaultModelLoader loads from the same folder; and the bad cases."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

torch = pytest.importorskip("torch")  # present wherever vLLM is; vllm_installed fails without it

from conftest import Root  # noqa: E402

import model_loader  # noqa: E402
from model_loader import vllm as plugin  # noqa: E402


@pytest.fixture(scope="module")
def vllm_world(vllm_installed: None) -> Iterator[Any]:
    """vLLM's distributed state, once a process (world size 1, gloo), and its modules."""
    import vllm.config as vc
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    plugin.register()
    with vc.set_current_vllm_config(vc.VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method="tcp://127.0.0.1:0")
        initialize_model_parallel(1, 1)
    yield vc


def build(vc: Any, folder: Path, load_format: str, extra: Dict[str, Any]) -> Tuple[Any, Any]:
    """A fresh VllmConfig (layers register by name in it) and vLLM's model, weights unloaded."""
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    config = vc.VllmConfig(
        model_config=vc.ModelConfig(model=str(folder), dtype="float32", skip_tokenizer_init=True,
                                    enforce_eager=True),
        device_config=vc.DeviceConfig("cpu"),
        load_config=vc.LoadConfig(load_format=load_format, model_loader_extra_config=extra))
    with vc.set_current_vllm_config(config), set_default_torch_dtype(torch.float32), \
            torch.device("cpu"):
        return config, initialize_model(vllm_config=config)


def load(vc: Any, folder: Path, load_format: str = "auto",
         extra: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """The raw parameters after the loader of load_format filled vLLM's model from folder."""
    from vllm.model_executor.model_loader import get_model_loader

    config, model = build(vc, folder, load_format, extra or {})
    with vc.set_current_vllm_config(config):
        get_model_loader(config.load_config).load_weights(model, config.model_config)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def settings(served: Root, model_id: str, **more: Any) -> Dict[str, Any]:
    return {"socket": served.server.socket, "server": served.server.addr, "model_id": model_id,
            **more}


@pytest.mark.parametrize("name", ["llama-sharded", "qwen2-tied"])
def test_every_parameter_equals_vllms_own_loader(
        name: str, served: Root, built: Callable[[str], Path], vllm_world: Any,
        tmp_path: Path) -> None:
    folder = built(name)
    model_id = f"vllm/{name}"
    served.publish(folder, model_id)
    reference = load(vllm_world, folder)
    log_before = len(served.server.log.lines)
    # vLLM reads the config from a folder holding only the served small files: the weights can
    # come from nowhere but the socket.
    small = tmp_path / "small"
    written = plugin.write_files(model_id, small, socket=served.server.socket)
    assert "config.json" in written and not list(small.glob("*.safetensors")), written
    got = load(vllm_world, small, plugin.LOAD_FORMAT, settings(served, model_id))
    assert set(got) == set(reference)
    unequal = [n for n in reference if not torch.equal(got[n], reference[n])]
    assert not unequal, f"{len(unequal)} of {len(reference)} parameters differ: {unequal[:5]}"
    attached = [line for line in served.server.log.lines[log_before:]
                if "client attached" in line and model_id in line]
    assert len(attached) == 2, attached  # the files' short lease, then the weights'
    assert served.server.clients(model_id) == 0, "the lease outlived the load"


def test_tensors_come_in_vllms_checkpoint_order(served: Root, built: Callable[[str], Path],
                                                vllm_world: Any) -> None:
    """The shards in natural order, the names sorted within each, as DefaultModelLoader reads."""
    from vllm.model_executor.model_loader import get_model_loader

    folder = built("llama-sharded")
    assert len(list(folder.glob("model-*.safetensors"))) >= 3, "the fixture is not sharded"
    served.publish(folder, "vllm/llama-sharded")
    config, model = build(vllm_world, folder, "auto", {})
    with vllm_world.set_current_vllm_config(config):
        own = [n for n, _ in get_model_loader(config.load_config).get_all_weights(
            config.model_config, model)]
    with model_loader.attach("vllm/llama-sharded", served.server.socket,
                             load_if_needed=True) as att:
        ours = [n for n, _ in plugin.checkpoint_weights(att)]
        assert {s.file for s in att.tensor_specs.values()} == {
            p.name for p in folder.glob("model-*.safetensors")}
    assert ours == own


def test_a_missing_tensor_fails_naming_it(served: Root, built: Callable[[str], Path],
                                          vllm_world: Any) -> None:
    folder = built("llama-no-head")
    served.publish(folder, "vllm/llama-no-head")
    with pytest.raises(ValueError, match=r"llama-no-head.*lm_head\.weight"):
        load(vllm_world, folder, plugin.LOAD_FORMAT, settings(served, "vllm/llama-no-head"))
    assert served.server.clients("vllm/llama-no-head") == 0, "a failed load kept its lease"


def test_unreachable_server_is_a_clear_error_and_fallback_loads_from_disk(
        built: Callable[[str], Path], vllm_world: Any, tmp_path: Path) -> None:
    folder = built("qwen2-tied")
    nowhere = {"socket": str(tmp_path / "no.sock"), "server": "127.0.0.1:1",
               "model_id": "vllm/qwen2-tied"}
    with pytest.raises(plugin.ModelLoaderUnreachable,
                       match=r"cannot be reached \(attach socket .*no\.sock.*fallback"):
        load(vllm_world, folder, plugin.LOAD_FORMAT, nowhere)
    got = load(vllm_world, folder, plugin.LOAD_FORMAT, {**nowhere, "fallback": True})
    reference = load(vllm_world, folder)
    assert set(got) == set(reference)
    assert all(torch.equal(got[n], reference[n]) for n in reference)


def test_unknown_model_and_wrong_device_are_clear_errors(
        served: Root, built: Callable[[str], Path], vllm_world: Any) -> None:
    folder = built("qwen2-tied")
    served.publish(folder, "vllm/qwen2-tied")
    with pytest.raises(model_loader.ModelLoaderError, match="NOT_FOUND.*vllm/nobody"):
        load(vllm_world, folder, plugin.LOAD_FORMAT, settings(served, "vllm/nobody"))
    with pytest.raises(model_loader.ModelLoaderError, match="INVALID_ARGUMENT.*gpu7"):
        load(vllm_world, folder, plugin.LOAD_FORMAT,
             settings(served, "vllm/qwen2-tied", device="gpu7"))
    # A GPU of a server without one: LoadModel says so.
    with pytest.raises(model_loader.ModelLoaderError,
                       match="FAILED_PRECONDITION.*cuda:0 is not available"):
        load(vllm_world, folder, plugin.LOAD_FORMAT,
             settings(served, "vllm/qwen2-tied", device="cuda:0"))
    # Resident on the cpu, asked on a GPU through the socket alone (gRPC unreachable): the
    # attach is refused naming both.
    load(vllm_world, folder, plugin.LOAD_FORMAT, settings(served, "vllm/qwen2-tied"))
    with pytest.raises(model_loader.AttachError,
                       match="FAILED_PRECONDITION.*resident on cpu, not cuda:0"):
        load(vllm_world, folder, plugin.LOAD_FORMAT,
             settings(served, "vllm/qwen2-tied", device="cuda:0", server="127.0.0.1:1"))


def test_unknown_settings_are_refused_by_name(vllm_world: Any, built: Callable[[str], Path]
                                              ) -> None:
    with pytest.raises(ValueError, match="sokcet"):
        load(vllm_world, built("qwen2-tied"), plugin.LOAD_FORMAT, {"sokcet": "/x"})
