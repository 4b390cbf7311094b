"""``python -m jittor_impl.kernels``: rewrites ``README.md`` here from the operator table."""

from pathlib import Path

from .operators import render_readme

path = Path(__file__).resolve().parent / "README.md"
path.write_text(render_readme())
print(f"wrote {path}")
