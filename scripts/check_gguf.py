"""Convert an export to GGUF with llama.cpp's own converter and check that llama.cpp computes the same
logits and token ids as transformers and tiktoken.

Needs a llama.cpp source tree (for ``convert_hf_to_gguf.py`` and its ``gguf-py``) and the
``llama-cpp-python`` bindings in this Python; neither is a dependency of hf-gpt2-train. The sdist of
llama-cpp-python carries both (``vendor/llama.cpp``):

    pip download llama-cpp-python --no-deps --no-binary :all: && tar xzf llama_cpp_python-*.tar.gz
    pip install ./llama_cpp_python-*.tar.gz      # builds llama.cpp for this CPU (minutes)
    python scripts/check_gguf.py out/quickstart-hf --llama_cpp llama_cpp_python-*/vendor/llama.cpp

Prints one JSON object (the differences) and exits 0 when llama.cpp agrees, 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import hf_gpt2_train  # noqa: F401  (before transformers: it quiets torchao's import-time warnings)

PROMPT = ("The GPT-2 tokenizer splits text into byte-pair tokens; numbers like 1234567 and symbols such as "
          "<|endoftext|> are handled the same way in every implementation.\n  Indented lines, too!")


def convert(export: Path, llama_cpp: Path, out: Path) -> None:
    """llama.cpp's converter, run as its README says, f32 so that only the arithmetic can differ."""
    env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
    r = subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(export), "--outfile",
                        str(out), "--outtype", "f32"], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"llama.cpp's convert_hf_to_gguf.py failed on {export}:\n{r.stderr[-2000:]}")


def compare(export: Path, gguf: Path, prompt: str) -> dict[str, object]:
    import llama_cpp
    import numpy as np
    import torch
    from transformers import GPT2LMHeadModel

    from hf_gpt2_train.data.tokenizer import get_encoding

    ids = get_encoding().encode(prompt, allowed_special="all")
    model = GPT2LMHeadModel.from_pretrained(export).eval()
    ids = ids[: model.config.n_positions]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=model.config.n_positions, logits_all=True, verbose=False)
    llama_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)[: len(ids)]
    llm.eval(ids)  # the same ids on both sides: logits compare the model, llama_ids the tokenizer
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)[:, : ref.shape[1]]
    diff = np.abs(got - ref)
    return {
        "tokens": len(ids),
        "tokenizer_ids_equal": llama_ids == ids,
        "max_abs_logit_diff": float(diff.max()),
        "max_rel_logit_diff": float(diff.max() / np.abs(ref).max()),
        "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path, help="an `hf-gpt2-train export` folder")
    ap.add_argument("--llama_cpp", type=Path, required=True, help="a llama.cpp source tree")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--tolerance", type=float, default=1e-3, help="largest logit difference, relative to the largest logit")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "model.gguf"
        convert(args.export, args.llama_cpp, gguf)
        result = compare(args.export, gguf, args.prompt)
    ok = (result["tokenizer_ids_equal"] and result["argmax_agreement"] == 1.0
          and result["max_rel_logit_diff"] <= args.tolerance)
    print(json.dumps({**result, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
