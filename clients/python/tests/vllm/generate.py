"""One vLLM engine in this process: greedy tokens for the prompt, as JSON on the last line.

python generate.py FOLDER LOAD_FORMAT [EXTRA_JSON [GRPC_ADDRESS MODEL_ID]]: with the address, it
also reports how many clients the server counts on the model while the engine is up."""

from __future__ import annotations

import json
import os
import sys

from checkpoints import PROMPT, TOKENS


def main() -> None:
    folder, load_format = sys.argv[1], sys.argv[2]
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, load_format=load_format, model_loader_extra_config=extra,
              dtype="float32", enforce_eager=True, max_model_len=128, seed=0)
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=TOKENS))[0]
    result = {"prompt": list(out.prompt_token_ids), "tokens": list(out.outputs[0].token_ids),
              "pid": os.getpid()}
    if len(sys.argv) > 5:
        import grpc

        from model_loader import pb2
        from model_loader._proto import model_loader_pb2_grpc as pb2_grpc

        with grpc.insecure_channel(sys.argv[4]) as channel:
            status = pb2_grpc.ModelLoaderStub(channel).GetModel(
                pb2.GetModelRequest(model_id=sys.argv[5]), timeout=30)
        result["clients_while_serving"] = status.attached_clients
    print(json.dumps(result))


if __name__ == "__main__":
    main()
