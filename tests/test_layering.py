"""The install keeps the standard library's `platform`, and `flora` stays free of the platform layer."""

import json
import subprocess
import sys
import sysconfig

PROBE = """
import json, sys
import platform
import flora
import flora_platform
print(json.dumps({
    "platform_file": platform.__file__,
    "has_system": hasattr(platform, "system"),
    "loaded": sorted(m for m in ("ray", "deepspeed", "mlflow") if m in sys.modules),
}))
"""


def test_platform_is_stdlib_and_flora_loads_no_ray(tmp_path):
    # A fresh interpreter outside the repo sees only what the install put on the path.
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["platform_file"].startswith(sysconfig.get_paths()["stdlib"]), probe
    assert probe["has_system"]
    assert probe["loaded"] == [], f"import flora pulled in {probe['loaded']}"
