"""Start-up stays fast: the CLI, `validate` and `plugins` import no heavy library."""

import subprocess
import sys
from pathlib import Path

HEAVY = ["torch", "transformers", "timm", "diffusers", "peft", "evaluate", "accelerate", "datasets", "matplotlib", "sklearn"]
REPO = Path(__file__).resolve().parent.parent


def imported_after(code: str) -> set[str]:
    probe = f"""
import sys
{code}
print("HEAVY:", *sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    (line,) = [l for l in out.stdout.splitlines() if l.startswith("HEAVY:")]
    return set(line.split()[1:])


def test_help_imports_no_heavy_library():
    code = "from finetune.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert imported_after(code) == set()


def test_validate_and_plugins_import_no_heavy_library():
    code = (
        "from finetune.cli import main\n"
        "for args in (['validate', 'recipes/quickstart.yaml'], ['plugins']):\n"
        "    try:\n        main(args)\n    except SystemExit:\n        pass"
    )
    assert imported_after(code) == set()
