"""Install tools/torchvision_cpu_fix.py into this interpreter's site-packages, only if needed.

Needed only when torchvision's compiled extension cannot load against the installed torch
(the CPU torch + CUDA torchvision wheel combination). Idempotent; prints what it did.
"""
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SITE = Path(sysconfig.get_paths()["purelib"])
PTH = SITE / "medreasoner_torchvision_fix.pth"
MOD = SITE / "torchvision_cpu_fix.py"


def torchvision_imports_cleanly() -> bool:
    code = "import torchvision, torch; torch.ops.torchvision.nms"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def main() -> int:
    PTH.unlink(missing_ok=True)
    MOD.unlink(missing_ok=True)
    if torchvision_imports_cleanly():
        print("torchvision extension loads: no fix installed")
        return 0
    shutil.copyfile(HERE / "torchvision_cpu_fix.py", MOD)
    PTH.write_text("import torchvision_cpu_fix\n")
    if subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode:
        print("torchvision still fails to import after the fix", file=sys.stderr)
        return 1
    print(f"torchvision C extension cannot load here: installed import fix {PTH.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
