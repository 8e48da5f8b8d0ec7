"""One vLLM engine: greedy tokens for the prompt, as JSON on a line starting "RESULT ".

python generate.py FOLDER LOAD_FORMAT [--extra JSON] [--tp N] [--server ADDRESS --model-id ID]:
with the address, it also reports how many clients the server counts on the model while the
engine is up."""

from __future__ import annotations

import argparse
import json
import os

from checkpoints import PROMPT, TOKENS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("load_format")
    parser.add_argument("--extra", default="{}")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--server")
    parser.add_argument("--model-id")
    args = parser.parse_args()
    from vllm import LLM, SamplingParams

    more = {"distributed_executor_backend": "mp"} if args.tp > 1 else {}
    llm = LLM(model=args.folder, load_format=args.load_format,
              model_loader_extra_config=json.loads(args.extra), dtype="float32",
              enforce_eager=True, max_model_len=128, seed=0, tensor_parallel_size=args.tp,
              **more)
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=TOKENS))[0]
    result = {"prompt": list(out.prompt_token_ids), "tokens": list(out.outputs[0].token_ids),
              "pid": os.getpid()}
    if args.server:
        import grpc

        from model_loader import pb2
        from model_loader._proto import model_loader_pb2_grpc as pb2_grpc

        with grpc.insecure_channel(args.server) as channel:
            status = pb2_grpc.ModelLoaderStub(channel).GetModel(
                pb2.GetModelRequest(model_id=args.model_id), timeout=30)
        result["clients_while_serving"] = status.attached_clients
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
