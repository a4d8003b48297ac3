"""benchmarks/common.py: the machine every table and JSON names, the JSON writer, and the rule that a
benchmark imports nothing from another benchmark or from tests/ (only common.py)."""
import ast
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"
TESTS = Path(__file__).parent
_NAME = "mmsearch_benchmarks_common"  # the name tests/helpers.py loads it under: one module object
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, BENCH / "common.py")
    sys.modules[_NAME] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_NAME])
common = sys.modules[_NAME]

AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm sse4a misalignsse 3dnowprefetch osvw topoext ssbd ibrs ibpb stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr arat npt nrip_save umip rdpid
vmx flags\t: avx512f avx512_bf16
bugs\t\t: sysret_ss_attrs spectre_v1 spectre_v2 spec_store_bypass

processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu avx2
"""

AVX512 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme sse sse2 avx f16c fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8 hypervisor
"""


def test_an_avx2_only_cpu_has_avx2_and_none_of_the_avx512_flags():
    m = common.machine(AVX2_ONLY)
    assert m["cpu"] == "AMD EPYC 7B12"
    assert m["flags"] == ["avx2"]  # not 'vmx flags', not the second processor's line


def test_an_avx512_cpu_lists_its_avx512_bf16_vnni_and_amx_flags():
    m = common.machine(AVX512)
    assert m["cpu"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert m["flags"] == ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile",
                          "avx_vnni"]
    line = common.machine_line(m)
    assert line.startswith("machine: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (avx2, avx512f, avx512_bf16, ")
    assert f"{m['cpu_count']} cores" in line and "load " in line and f"python {m['python']}" in line


def test_a_cpu_named_only_by_its_brand_is_told_apart_by_family_and_model():
    zen3 = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: avx2\n\n" \
           "processor\t: 1\ncpu family\t: 23\nmodel\t\t: 49\n"
    m = common.machine(zen3)
    assert m["cpu_id"] == "family 25 model 1"  # the first processor's, and 'model' is not 'model name'
    assert common.machine_line(m).startswith("machine: AMD EPYC family 25 model 1 (avx2)")
    named = common.machine(AVX2_ONLY.replace("vendor_id", "cpu family\t: 23\nmodel\t\t: 49\nvendor_id"))
    assert named["cpu_id"] == "family 23 model 49"
    assert common.machine_line(named).startswith("machine: AMD EPYC 7B12 (avx2)")  # a real model name says it


def test_without_a_model_name_or_flags_the_machine_is_still_described(monkeypatch):
    monkeypatch.setattr(common.platform, "processor", lambda: "arm")
    m = common.machine("processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n")
    assert m["cpu"] == "arm" and m["flags"] == []
    assert "(no AVX2, AVX-512, AMX or VNNI)" in common.machine_line(m)


def test_cores_load_versions_and_isa_switches(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    m = common.machine(AVX512)
    assert m["cpu_count"] >= m["usable_cores"] >= 1
    assert len(m["load"]) == 3 and all(isinstance(v, float) for v in m["load"])
    assert "torch" not in m  # never imported just to name its version
    assert m["env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert common.machine_line(m).endswith("; ONEDNN_MAX_CPU_ISA=AVX2")
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="9.9.9+cpu"))
    m = common.machine(AVX512)
    assert m["torch"] == "9.9.9+cpu" and "torch 9.9.9+cpu" in common.machine_line(m)


def test_write_results_writes_json_with_the_machine_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    path = common.write_results("some_bench", {"rows": [1, 2], "label": "é"})
    assert path == tmp_path / "results" / "some_bench.json"
    data = json.loads(path.read_text())
    assert data["rows"] == [1, 2] and data["label"] == "é"
    assert data["machine"]["cpu"] and isinstance(data["machine"]["flags"], list) and len(data["machine"]["load"]) == 3
    out = tmp_path / "elsewhere" / "x.json"  # an explicit --out; a machine already there is kept
    common.write_results(out, {"machine": {"cpu": "recorded earlier"}}, indent=1)
    assert json.loads(out.read_text()) == {"machine": {"cpu": "recorded earlier"}}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["elsewhere", "results", "some_bench.json", "x.json"]


def test_markdown_table():
    assert common.markdown_table(["a", "b"], [(1, "x"), ("", 2.5)], align="lr") == (
        "| a | b |\n|---|---:|\n| 1 | x |\n| | 2.5 |")


# ---- no benchmark imports another benchmark or a test file ---------------------------------------
_PATH_HOOKS = re.compile(r"sys\.path|PYTHONPATH|addsitedir|spec_from_file_location|import_module|run_path|SourceFileLoader")
_LOADERS = re.compile(r"spec_from_file_location|import_module|run_path|SourceFileLoader")  # by file or by name
_TESTS_DIR = re.compile(r"(^|[/\\])tests([/\\]|$)")


def offences(source: str, benchmarks: set, test_modules: set) -> list:
    """What in `source` (a benchmark) reaches another benchmark module or tests/: imports (anywhere, also
    inside functions) of a benchmark other than common or of a tests/ module, and path hooks
    (sys.path, PYTHONPATH, importlib by file or name, runpy) that mention tests/ or another benchmark."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else ["." * node.level + (node.module or "")]
        else:
            names = []
        for name in names:
            top = name.split(".")[0]
            if name.startswith(".") or top == "tests" or top in test_modules or (top in benchmarks and top != "common"):
                out.append(f"line {node.lineno}: import {name}")
        if isinstance(node, (ast.Call, ast.Assign, ast.AugAssign, ast.keyword, ast.Dict)):
            text = ast.unparse(node)
            if not _PATH_HOOKS.search(text):
                continue
            loader = bool(_LOADERS.search(text))
            for const in ast.walk(node):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    stem = Path(const.value).name.removesuffix(".py")
                    if _TESTS_DIR.search(const.value) or (loader and stem in benchmarks and stem != "common"):
                        out.append(f"line {getattr(node, 'lineno', '?')}: {text[:80]}")
    return sorted(set(out))


def _modules(folder: Path) -> set:
    return {p.stem for p in folder.glob("*.py")}


@pytest.mark.parametrize("source", [
    "from train_synth import CACHE, data_dir",
    "def main():\n    from index_throughput import make_photos",
    "import helpers",
    "from tests.helpers import x",
    "import sys\nsys.path.insert(0, str(ROOT / 'tests'))",
    "import sys\nsys.path.append('/work/x/tests/')",
    "env = dict(PYTHONPATH=str(ROOT / 'tests'))",
    "spec = importlib.util.spec_from_file_location('t', HERE / 'train_synth.py')",
    "mod = importlib.import_module('eval_synth')",
])
def test_the_import_rule_catches(source):
    assert offences(source, _modules(BENCH), _modules(TESTS))


def test_the_import_rule_allows_common_the_package_and_the_repository_root():
    source = ("import sys\nsys.path.insert(0, str(ROOT))\nfrom common import machine\nimport common\n"
              "from mmsearch.config import ModelSpec\nenv = dict(PYTHONPATH=str(ROOT))\nrows = ['tests', 'train_synth']\n")
    assert offences(source, _modules(BENCH), _modules(TESTS)) == []


def test_no_benchmark_imports_another_benchmark_or_a_test_file():
    scripts = sorted(BENCH.glob("*.py"))
    assert len(scripts) > 10 and BENCH / "common.py" in scripts
    found = {p.name: offences(p.read_text(), _modules(BENCH), _modules(TESTS)) for p in scripts}
    assert {name: o for name, o in found.items() if o} == {}
