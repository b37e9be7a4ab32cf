"""The shape of the code: imports form layers (no cycle, data/ imports nothing above it), model.py
is the architecture alone, and only engine.py decodes token by token."""
import ast
import glob
import os

from helpers import ROOT


def modules():
    """{module name: parsed file} of the project's own modules (the root's and data/'s; scripts included)."""
    out = {}
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "data", "*.py")):
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        with open(path, encoding="utf-8") as f:
            out[rel.removesuffix(".__init__")] = ast.parse(f.read(), path)
    return out


def imports(tree, known):
    """The project modules a file imports, anywhere in it (a function's local import counts too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != "data"}


def graph():
    mods = modules()
    return {name: imports(tree, mods) for name, tree in mods.items()}


def cycles(g):
    """Every cycle's modules, found by depth-first search (a back edge closes one)."""
    out, state = [], {}

    def visit(n, path):
        state[n] = "open"
        for m in sorted(g[n]):
            if state.get(m) == "open":
                out.append(path[path.index(m):] + [m])
            elif m not in state:
                visit(m, path + [m])
        state[n] = "done"
    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    return out


def test_imports_have_no_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_data_imports_nothing_above_it():
    g = graph()
    upward = {n: sorted(m for m in deps if not m.startswith("data.")) for n, deps in g.items() if n.startswith("data.")}
    assert {n: d for n, d in upward.items() if d} == {}
    assert "data.task" in g and "data.chat" in g  # the walk saw the package


def test_config_imports_no_project_module_that_imports_it():
    g = graph()

    def reach(n, seen=()):
        return set().union(*({m} | reach(m, seen + (n,)) for m in g[n] if m not in seen)) if g[n] else set()
    assert "config" not in reach("config")


def test_model_py_is_the_architecture_alone():
    with open(os.path.join(ROOT, "model.py"), encoding="utf-8") as f:
        text = f.read()
    assert text.count("\n") <= 400
    assert "safetensors" not in text and "def generate" not in text and "def sample" not in text


def kv_cache_calls(tree):
    """Calls that pass the model a KV cache (kv_cache=...) in a for or while loop, as line numbers."""
    lines = []
    for loop in (n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While))):
        for node in ast.walk(loop):
            if isinstance(node, ast.Call) and any(k.arg == "kv_cache" for k in node.keywords):
                lines.append(node.lineno)
    return lines


def test_only_engine_py_decodes_token_by_token():
    """No module but engine.py calls the model with a KV cache in a loop; engine.py itself does
    (its decode_n_tokens), through the one call in prefill."""
    extra = glob.glob(os.path.join(ROOT, "bench", "*.py")) + glob.glob(os.path.join(ROOT, "recipes", "*.py"))
    trees = dict(modules(), **{os.path.relpath(p, ROOT): ast.parse(open(p, encoding="utf-8").read()) for p in extra})
    loops = {name: kv_cache_calls(t) for name, t in trees.items()}
    assert {n: v for n, v in loops.items() if v} == {}
    engine = trees["engine"]
    calls = [n for n in ast.walk(engine) if isinstance(n, ast.Call) and any(k.arg == "kv_cache" for k in n.keywords)]
    assert len(calls) == 1  # prefill's; decode_n_tokens loops over decode_one_token, which calls prefill
    decode = next(n for n in ast.walk(engine) if isinstance(n, ast.FunctionDef) and n.name == "decode_n_tokens")
    assert any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "decode_one_token"
               for loop in ast.walk(decode) if isinstance(loop, ast.For) for n in ast.walk(loop))


def test_the_decode_loop_check_sees_a_loop():
    tree = ast.parse("for t in range(3):\n    logits = model(tok, mask, kv_cache=cache, pos=t)\n")
    assert kv_cache_calls(tree) == [2]
