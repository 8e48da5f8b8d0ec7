from __future__ import annotations

import gc
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from fakeserver import (
    FakeServer,
    Handler,
    Model,
    Tensor,
    answer,
    bf16_bits,
    frame,
    memfd_mappings,
    open_fds,
    response_for,
    sealed_memfd,
    send_with_fds,
)

import model_loader
from model_loader import AttachError, attach, pb2

Serve = Callable[[Handler], FakeServer]


def test_values_and_metadata(model_server: FakeServer) -> None:
    with attach("org/model", model_server.path) as att:
        assert att.model_id == "org/model"
        assert att.status.state == pb2.MODEL_STATE_LOADED
        assert att.status.attached_clients == 1
        assert [b.kind for b in att.buffers] == ["HOST_MEMFD", "HOST_MEMFD"]
        assert att.tensor_specs["c.ids"].buffer == 1
        t = att.tensors
        assert sorted(t) == ["a.weight", "b.bf16", "c.ids", "e.empty", "f.scalar"]
        np.testing.assert_array_equal(t["a.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))
        assert t["a.weight"].dtype == np.float32
        np.testing.assert_array_equal(t["c.ids"], [[1, -2], [3, 1 << 40]])
        assert t["c.ids"].dtype == np.int64
        assert t["f.scalar"].shape == () and t["f.scalar"] == 1.5
        assert t["e.empty"].shape == (0, 4)
        bf16 = t["b.bf16"]
        assert bf16.shape == (4,)
        ml_dtypes = pytest.importorskip("ml_dtypes")
        assert bf16.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(bf16.astype(np.float32), [1.0, -2.0, 0.5, 3.0])


def test_request_fields(model_server: FakeServer) -> None:
    attach("org/model", model_server.path).close()
    attach("org/model", model_server.path, revision="v2", device="cpu", dtype="bf16",
           load_if_needed=True, files=True).close()
    plain, full = model_server.requests
    assert not plain.HasField("revision") and not plain.HasField("device")
    assert not plain.HasField("dtype")
    assert not plain.load_if_needed and not plain.include_files
    assert (full.revision, full.device, full.dtype, full.load_if_needed, full.include_files) == (
        "v2", "cpu", "bf16", True, True)


def _model_with_files() -> Model:
    model = Model([[Tensor("w", "F32", (1,), np.ones(1, "<f4").tobytes())]])
    model.files = {"config.json": b'{"model_type": "llama"}', "tokenizer/vocab.txt": b"a\nb\n",
                   "empty.txt": b""}
    return model


def test_files_arrive_checked_when_asked(serve: Serve) -> None:
    """The model's small files: listed always, their bytes (sha256-checked) with files=True."""
    server = serve(lambda conn, r: answer(conn, _model_with_files(), r.model_id, r.include_files))
    with attach("org/model", server.path) as att:
        assert sorted(att.file_specs) == ["config.json", "empty.txt", "tokenizer/vocab.txt"]
        spec = att.file_specs["tokenizer/vocab.txt"]
        assert (spec.size_bytes, spec.sha256) == (4, hashlib.sha256(b"a\nb\n").hexdigest())
        with pytest.raises(ValueError, match="files=True"):
            att.files
    with attach("org/model", server.path, files=True) as att:
        assert att.files == _model_with_files().files
    for _ in range(2):
        assert server.hangups.acquire(timeout=5)


def test_a_file_that_does_not_match_its_sha256_is_data_loss(serve: Serve) -> None:
    """Bytes that differ from the digest the server sent are refused, and nothing stays open."""
    def corrupt(conn: socket.socket, request: pb2.AttachRequest) -> None:
        model = _model_with_files()
        contents, specs = model.layout()
        response = response_for(model, contents, specs, request.model_id, True)
        response.files[0].content = b'{"model_type": "bert"}'
        fds = [sealed_memfd(c) for c in contents]
        try:
            send_with_fds(conn, frame(response.SerializeToString()), fds)
        finally:
            for fd in fds:
                os.close(fd)

    server = serve(corrupt)
    before = open_fds()
    with pytest.raises(AttachError) as e:
        attach("org/model", server.path, files=True)
    assert e.value.code_name == "DATA_LOSS" and "config.json" in e.value.message
    assert server.hangups.acquire(timeout=10)
    assert open_fds() == before


def test_socket_from_environment(model_server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(model_loader.SOCKET_ENV, model_server.path)
    assert model_loader.default_socket() == model_server.path
    with attach("org/model") as att:
        assert "a.weight" in att.tensors
    monkeypatch.delenv(model_loader.SOCKET_ENV)
    assert model_loader.default_socket() == model_loader.DEFAULT_SOCKET


def test_arrays_are_read_only(model_server: FakeServer) -> None:
    with attach("org/model", model_server.path) as att:
        for name, arr in att.tensors.items():
            assert not arr.flags.writeable, name
        arr = att.tensors["a.weight"]
        with pytest.raises(ValueError):
            arr[0, 0] = 1.0
        with pytest.raises(ValueError):
            arr.flags.writeable = True


def test_mapping_is_shared_and_zero_copy(model_server: FakeServer) -> None:
    with attach("org/model", model_server.path) as att:
        before = memfd_mappings()
        tensors = att.tensors
        maps = [line for line in memfd_mappings() if line not in before]
        # One read-only shared mapping of each memfd, and no other copy of the bytes.
        assert len(maps) == 2, maps
        assert all(line.split()[1] == "r--s" for line in maps), maps
        spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps]
        for arr in tensors.values():
            if arr.size:
                addr = arr.__array_interface__["data"][0]
                assert any(lo <= addr < hi for lo, hi in spans)
        del tensors, arr


def test_error_answers_raise_attach_error(serve: Serve) -> None:
    def refuse(conn: socket.socket, request: pb2.AttachRequest) -> None:
        code, message = {"loading/model": (9, "org/model is LOADING, not LOADED"),
                         "no/model": (5, "no model no/model"),
                         "big/model": (8, "12 GB do not fit the cpu budget")}[request.model_id]
        conn.sendall(frame(pb2.AttachResponse(code=code, message=message).SerializeToString()))

    server = serve(refuse)
    for model_id, code, name in [("loading/model", 9, "FAILED_PRECONDITION"),
                                 ("no/model", 5, "NOT_FOUND"),
                                 ("big/model", 8, "RESOURCE_EXHAUSTED")]:
        with pytest.raises(AttachError) as info:
            attach(model_id, server.path)
        assert (info.value.code, info.value.code_name) == (code, name)
        assert info.value.message
        assert name in str(info.value)
    assert isinstance(info.value, model_loader.ModelLoaderError)


@pytest.mark.parametrize("reply, code", [
    (frame(b"\xff\xff\xff\xff"), 13),                  # not a protobuf message
    (struct.pack("<I", 100) + b"\x08\x00", 13),         # shorter than its length
    (b"\x01\x00", 13),                                  # half a header
    (struct.pack("<I", 0xFFFFFFF0), 13),                 # an absurd length
    (b"", 14),                                          # hung up without answering
])
def test_malformed_answers_raise_cleanly(serve: Serve, reply: bytes, code: int) -> None:
    def garbage(conn: socket.socket, request: pb2.AttachRequest) -> None:
        conn.sendall(reply)
        conn.shutdown(socket.SHUT_RDWR)

    server = serve(garbage)
    fds = open_fds()
    with pytest.raises(AttachError) as info:
        attach("org/model", server.path, timeout=5)
    assert info.value.code == code, info.value
    assert server.hangups.acquire(timeout=5)
    assert open_fds() == fds


def test_descriptor_count_must_match(serve: Serve) -> None:
    def one_fd_short(conn: socket.socket, request: pb2.AttachRequest) -> None:
        buffer = pb2.AttachedBuffer(kind=pb2.BUFFER_KIND_HOST_MEMFD, size_bytes=64)
        response = pb2.AttachResponse(buffers=[buffer, buffer])
        fd = sealed_memfd(b"\0" * 64)
        socket.send_fds(conn, [frame(response.SerializeToString())], [fd])
        os.close(fd)

    server = serve(one_fd_short)
    fds = open_fds()
    with pytest.raises(AttachError, match="2 buffers but carried 1") as info:
        attach("org/model", server.path)
    assert info.value.code_name == "INTERNAL"
    assert server.hangups.acquire(timeout=5)
    assert open_fds() == fds


def test_tensor_outside_its_buffer_is_refused(serve: Serve) -> None:
    class Overflowing(Model):
        def layout(self):  # type: ignore[no-untyped-def]
            contents, specs = super().layout()
            specs[0].size_bytes = len(contents[0]) + 4
            return contents, specs

    model = Overflowing([[Tensor("x", "U8", (4,), b"\1\2\3\4")]])
    server = serve(lambda conn, request: answer(conn, model))
    fds = open_fds()
    with pytest.raises(AttachError, match="past the") as info:
        attach("org/model", server.path)
    assert info.value.code == 13
    assert server.hangups.acquire(timeout=5)
    assert open_fds() == fds


def test_connect_failure_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(AttachError) as info:
        attach("org/model", tmp_path / "missing.sock")
    assert info.value.code_name == "UNAVAILABLE"


def test_no_answer_is_deadline_exceeded(serve: Serve) -> None:
    server = serve(lambda conn, request: None)
    start = time.monotonic()
    with pytest.raises(AttachError) as info:
        attach("org/model", server.path, timeout=0.3)
    assert info.value.code_name == "DEADLINE_EXCEEDED"
    assert time.monotonic() - start < 3


def test_alive_turns_false_when_the_server_closes(model_server: FakeServer) -> None:
    att = attach("org/model", model_server.path)
    assert att.alive()
    assert not att.wait_closed(0.05)
    model_server.drop_all()
    assert att.wait_closed(5)
    assert not att.alive()
    # The mapping outlives the lease.
    np.testing.assert_array_equal(att.tensors["c.ids"].ravel(), [1, -2, 3, 1 << 40])
    att.close()
    assert att.closed and not att.alive()


def test_close_ends_the_lease_and_unmaps(model_server: FakeServer) -> None:
    fds = open_fds()
    att = attach("org/model", model_server.path)
    assert model_server.answered.acquire(timeout=5)
    # Two buffers and a socket here, the connection on the fake server's side.
    assert open_fds() == fds + 4
    assert att.tensors["a.weight"][1, 2] == 5.0
    assert len(memfd_mappings()) == 2
    att.close()
    assert model_server.hangups.acquire(timeout=5), "the server did not see the lease end"
    assert memfd_mappings() == []
    assert open_fds() == fds
    att.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        _ = att.tensors


def test_live_views_keep_their_mapping_after_close(model_server: FakeServer) -> None:
    att = attach("org/model", model_server.path)
    weight = att.tensors["a.weight"]
    att.close()
    assert model_server.hangups.acquire(timeout=5)
    # The lease is gone; the memory stays valid while the array lives.
    assert len(memfd_mappings()) == 1
    assert weight[1, 2] == 5.0
    del weight
    gc.collect()
    assert memfd_mappings() == []


def test_forgotten_attachment_warns_and_releases(model_server: FakeServer) -> None:
    fds = open_fds()
    att = attach("org/model", model_server.path)
    with pytest.warns(ResourceWarning):
        del att
        gc.collect()
    assert model_server.hangups.acquire(timeout=5)
    assert open_fds() == fds


def test_bf16_without_ml_dtypes_is_raw_bits(model_server: FakeServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with attach("org/model", model_server.path) as att:
        bits = att.tensors["b.bf16"]
        assert bits.dtype == np.uint16
        np.testing.assert_array_equal(bits, bf16_bits([1.0, -2.0, 0.5, 3.0]))


def test_torch_tensors_share_the_mapping(model_server: FakeServer) -> None:
    torch = pytest.importorskip("torch")
    att = attach("org/model", model_server.path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = att.torch()
    assert t["a.weight"].dtype == torch.float32 and t["a.weight"].shape == (2, 3)
    assert torch.equal(t["a.weight"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert t["b.bf16"].dtype == torch.bfloat16
    assert t["b.bf16"].tolist() == [1.0, -2.0, 0.5, 3.0]
    assert t["c.ids"].tolist() == [[1, -2], [3, 1 << 40]]
    assert t["f.scalar"].shape == () and t["f.scalar"].item() == 1.5
    assert t["e.empty"].shape == (0, 4)
    # The same bytes as the numpy view: no copy.
    assert t["a.weight"].data_ptr() == att.tensors["a.weight"].__array_interface__["data"][0]
    assert len(memfd_mappings()) == 2
    att.close()
    # Tensors keep their mapping alive after close, like numpy arrays.
    assert t["c.ids"][1, 1].item() == 1 << 40
    del t
    gc.collect()
    assert memfd_mappings() == []


def test_torch_missing_is_a_clear_import_error(model_server: FakeServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with attach("org/model", model_server.path) as att:
        with pytest.raises(ImportError, match=r"model-loader-client\[torch\]"):
            att.torch()


def test_many_tensors_and_buffers(serve: Serve) -> None:
    # More buffers than fit one recvmsg's default ancillary space, and a body of many chunks.
    model = Model([[Tensor(f"t{i:03}.{j}", "I32", (3,),
                           np.array([i, j, i * j], dtype="<i4").tobytes()) for j in range(50)]
                   for i in range(40)])
    server = serve(lambda conn, request: answer(conn, model))
    with attach("org/model", server.path) as att:
        assert len(att.buffers) == 40
        t = att.tensors
        assert len(t) == 2000
        assert t["t039.49"].tolist() == [39, 49, 39 * 49]


def wide_model(buffers: int) -> Model:
    return Model([[Tensor(f"t{i:03}", "I32", (1,), np.array([i], dtype="<i4").tobytes())]
                  for i in range(buffers)])


def test_more_buffers_than_one_message_carries(serve: Serve) -> None:
    # 600 descriptors: three messages of at most 253, each with a part of the one frame.
    server = serve(lambda conn, request: answer(conn, wide_model(600)))
    fds = open_fds()
    with attach("org/model", server.path) as att:
        assert len(att.buffers) == 600
        assert [int(att.tensors[f"t{i:03}"][0]) for i in range(600)] == list(range(600))
    assert server.hangups.acquire(timeout=10)  # the fake server's end of the connection closed
    assert open_fds() == fds


def test_the_open_file_limit_is_a_readable_error(serve: Serve) -> None:
    # Descriptors the kernel cannot install (this process at its limit) are an error that says
    # so, and none of those that did arrive stays open.
    import resource

    server = serve(lambda conn, request: send_with_fds(conn, frame(response.SerializeToString()), sent))
    before = open_fds()
    contents, specs = wide_model(600).layout()
    sent = [sealed_memfd(c) for c in contents]  # made before the limit is lowered
    response = response_for(wide_model(600), contents, specs, "org/model")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds = open_fds()
    resource.setrlimit(resource.RLIMIT_NOFILE, (fds + 300, hard))
    try:
        with pytest.raises(AttachError) as refused:
            attach("org/model", server.path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in sent:
            os.close(fd)
    assert "open-file limit" in str(refused.value)
    assert server.hangups.acquire(timeout=10)  # the fake server's end of the connection closed
    assert open_fds() == before


def test_repr_mentions_the_model(model_server: FakeServer) -> None:
    with attach("org/model", model_server.path) as att:
        assert "org/model" in repr(att) and "open" in repr(att)
    assert "closed" in repr(att)


def test_host_file_buffers_map_the_file(serve: Serve, tmp_path: Path) -> None:
    # BUFFER_KIND_HOST_FILE: the model's file itself, opened read-only; tensors at its offsets.
    header = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
    weights = np.array([[1.5, -1.0], [0.25, 8.0]], dtype="<f4")
    path = tmp_path / "model.safetensors"
    path.write_bytes(header + weights.tobytes())

    def from_file(conn: socket.socket, request: pb2.AttachRequest) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        response = pb2.AttachResponse(
            status=pb2.ModelStatus(model_id=request.model_id, state=pb2.MODEL_STATE_LOADED),
            buffers=[pb2.AttachedBuffer(kind=pb2.BUFFER_KIND_HOST_FILE, device="cpu",
                                        size_bytes=path.stat().st_size)],
            tensors=[pb2.AttachedTensor(name="w", dtype="F32", shape=[2, 2], buffer=0,
                                        offset=len(header), size_bytes=16)])
        socket.send_fds(conn, [frame(response.SerializeToString())], [fd])
        os.close(fd)

    server = serve(from_file)
    with attach("org/model", server.path) as att:
        assert att.buffers[0].kind == "HOST_FILE"
        w = att.tensors["w"]
        np.testing.assert_array_equal(w, weights)
        with open("/proc/self/maps") as f:
            assert any(str(path) in line and line.split()[1] == "r--s" for line in f)
        with pytest.raises(ValueError):
            w[0, 0] = 0
        del w


def test_permission_denied(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(self: socket.socket, address: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(AttachError) as info:
        attach("org/model", tmp_path / "attach.sock")
    assert info.value.code_name == "PERMISSION_DENIED"


def test_descriptors_split_over_several_messages(serve: Serve) -> None:
    # Linux passes at most 253 descriptors in one message: a server with more buffers sends the
    # frame in pieces, each piece with its share of the descriptors.
    model = Model([[Tensor(f"t{i:03}", "U8", (1,), bytes([i % 256]))] for i in range(300)])

    def in_pieces(conn: socket.socket, request: pb2.AttachRequest) -> None:
        contents, specs = model.layout()
        data = frame(response_for(model, contents, specs, request.model_id).SerializeToString())
        fds = [sealed_memfd(c) for c in contents]
        socket.send_fds(conn, [data[:10]], fds[:253])
        socket.send_fds(conn, [data[10:]], fds[253:])
        for fd in fds:
            os.close(fd)

    server = serve(in_pieces)
    with attach("org/model", server.path) as att:
        assert len(att.buffers) == 300
        t = att.tensors
        assert [int(t[f"t{i:03}"][0]) for i in (0, 252, 253, 299)] == [0, 252, 253, 299 % 256]
        del t


def test_writing_through_a_torch_tensor_faults(model_server: FakeServer) -> None:
    pytest.importorskip("torch")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import model_loader
        att = model_loader.attach("org/model", {model_server.path!r})
        t = att.torch()["a.weight"]
        t.fill_(7.0)
        print("written", t.sum().item())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    with attach("org/model", model_server.path) as att:
        assert att.tensors["a.weight"][1, 2] == 5.0
