"""Read a safetensors file that may be anyone's: whatever is wrong with it (not a
safetensors file at all, a header that is not JSON or claims 2**40 bytes, a truncated
body, a symlink to something else) is one paragraph naming the file, never a traceback
from the Rust reader. safetensors itself never unpickles, so the content is safe to read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.core.errors import PipelineError


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        return load_file(str(path))
    except OSError:
        raise
    except Exception as e:  # SafetensorError, or a ValueError from the header's JSON
        target = f" (a link to {path.resolve()})" if path.is_symlink() else ""
        raise PipelineError(
            f"{path}{target} is not a readable safetensors file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}). Export or save the model "
            f"again, or check that the file was copied whole."
        ) from None
