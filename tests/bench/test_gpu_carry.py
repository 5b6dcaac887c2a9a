"""bench/gpu_carry.sh carries every wheel `restune serve` and bench/gpu.py load that the lent
GPU machine's image lacks: the import check's list and the script's list agree."""

from __future__ import annotations

from bench import gpu_carry


def test_the_carry_script_is_what_the_import_check_finds() -> None:
    packages = gpu_carry.carried()
    assert gpu_carry.script_packages(gpu_carry.SCRIPT.read_text()) == packages, (
        "bench/gpu_carry.sh is stale: run `python -m bench.gpu_carry --write`"
    )
    # What FastAPI imports at load, which a hand-kept list once missed.
    assert {"fastapi", "annotated-doc", "opentelemetry-api", "pydantic-core"} <= set(packages)
    assert not set(packages) & gpu_carry.DEVICE_IMAGE
    assert "torch" not in packages


def test_compiled_wheels_travel_for_every_device_python() -> None:
    script = gpu_carry.SCRIPT.read_text()
    assert "pydantic-core==" in script.split("COMPILED=(", 1)[1].split(")", 1)[0]
    assert f"for version in {' '.join(gpu_carry.DEVICE_PYTHONS)}; do" in script
    assert "3.12" in gpu_carry.DEVICE_PYTHONS  # the lent machine's python3
    assert not gpu_carry.is_pure("pydantic-core")
    assert gpu_carry.is_pure("fastapi")


def test_the_import_check_sees_the_server_and_the_bench() -> None:
    modules = set(gpu_carry.imported_modules())
    assert {"server", "bench", "fastapi", "uvicorn", "torch", "pydantic_core"} <= modules
    assert not modules & gpu_carry.OPTIONAL  # the server started without them


def test_script_packages_reads_both_arrays() -> None:
    text = "PURE=(a==1 b-c==2.0)\nCOMPILED=(d==3)\n"
    assert gpu_carry.script_packages(text) == {"a": "1", "b-c": "2.0", "d": "3"}
