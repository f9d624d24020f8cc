"""fastgrad's Sphinx extension: the estimator table, rendered from the estimators' declared facts.

``estimator_rows()`` reads :class:`fastgrad.method.Facts` off every public estimator class (and the measured
variance off the result file each names); the ``estimator-table`` directive renders them, all of them or one
family's (``:family: arm``, the module name shared by ``fastgrad/method/arm.py`` and ``fastgrad/functional/arm.py``).
Nothing in the table is written by hand, so it cannot disagree with the classes; ``tests/test_estimator_facts.py``
checks the facts against the estimators' behaviour. The build also copies ``benchmarks/results/*.png`` to
``docs/_static/results/`` so pages can show the committed plots.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Dict, List, Optional

from docutils import nodes
from docutils.parsers.rst import Directive, directives
from docutils.statemachine import StringList

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

FAMILY_TITLES = {
    "score_function": "Score function", "expect": "Exact enumeration", "gumbel_softmax": "Gumbel-softmax",
    "reparameterization": "Reparameterization", "arm": "ARM, DisARM, ARMS", "relax": "RELAX, REBAR, LAX",
    "vimco": "VIMCO", "double_cv": "Double CV, RODEO", "relaxed": "Relaxed and straight-through",
    "without_replacement": "Sets without replacement",
}
TOYS = {  # short names; docs/estimators/index.md says what each toy is
    "estimator_variance_cpu": "seed VAE",
    "estimator_variance_st_cpu": "seed VAE",
    "estimator_variance_reinmax_cpu": "seed VAE",
    "estimator_variance_carms_cpu": "seed VAE",
    "relax_toy_cpu": "RELAX toy",
    "double_cv_toy_cpu": "200-bit toy",
    "simple_k_subset_cpu": "k-subset toy",
}


def estimators() -> List[type]:
    """The public estimator classes (aliases once), in the order of ``fastgrad.method.__all__``."""
    import fastgrad.method as M
    out: List[type] = []
    for name in M.__all__:
        c = getattr(M, name)
        if isinstance(c, type) and issubclass(c, M.Method) and c.facts is not None and c not in out:
            out.append(c)
    return out


def family(cls: type) -> str:
    return cls.__module__.rsplit(".", 1)[-1]


def aliases(cls: type) -> List[str]:
    import fastgrad.method as M
    return [n for n in M.__all__ if getattr(M, n) is cls and n != cls.__name__]


def pretty_count(formula: str) -> str:
    """``"2*n"`` -> ``2n``, ``"n*D*K"`` -> ``n·D·K``, ``"K**D"`` -> ``K^D``."""
    f = formula.replace("**", "^")
    if "*" in f and f.split("*")[0].isdigit():
        head, rest = f.split("*", 1)
        f = head + rest.replace("*", "·")
    return f.replace("*", "·")


def measured(bench: Optional[tuple]) -> str:
    """The variance the estimator's declared benchmark row measured, with the toy it was measured on."""
    if not bench:
        return "—"
    stem, label = bench
    data = json.load(open(os.path.join(RESULTS, stem + ".json")))
    if "checkpoints" in data:
        rows = [r for r in data["checkpoints"][0]["rows"] if r["estimator"] == label]
        row = min(rows, key=lambda r: abs(r["evaluations"] - 8))
        return f"{row['grad_variance']:.3g} ({TOYS[stem]}, {row['evaluations']} evaluations)"
    if stem == "simple_k_subset_cpu":  # relative to the exact gradient's squared norm, at k = 3
        row = next(r for r in data["rows"] if r["estimator"] == label and r["k"] == 3)
        return f"{row['relative_variance']:.3g} relative ({TOYS[stem]}, k = 3)"
    run = next(r for r in data["runs"] if r["method"] == label)
    lv = [r["log_variance"] for r in run["rows"]]
    value = sum(lv) / len(lv) if stem == "relax_toy_cpu" else lv[-1]
    return f"log-variance {value:.1f} ({TOYS[stem]}, {label})"


def distributions(cls: type) -> str:
    if cls.facts.takes:
        return cls.facts.takes
    if not cls.accepts:
        return "any with `log_prob`"
    return ", ".join(c.__name__ for c in cls.accepts)


def estimator_rows(fam: Optional[str] = None) -> List[Dict[str, str]]:
    """One dict per estimator (column -> MyST Markdown cell), every family or one."""
    rows = []
    for cls in estimators():
        if fam is not None and family(cls) != fam:
            continue
        f = cls.facts
        name = f"{{class}}`~fastgrad.method.{cls.__name__}`"
        if aliases(cls):
            name += " (alias " + ", ".join(f"`{a}`" for a in aliases(cls)) + ")"
        if f.storchastic is None:
            st = "not in Storchastic"
        elif f.storchastic_correct is None:
            st = "same heuristic"
        elif f.storchastic_correct:
            st = "correct"
        else:
            st = f"**wrong**: {f.storchastic_bug}"
        rows.append({
            "Estimator": name,
            "Family": f"{{doc}}`{FAMILY_TITLES[family(cls)]} </estimators/{family(cls)}>`",
            "Distributions": distributions(cls),
            "Unbiased": ("yes" if f.unbiased else "no") + ("" if f.objective == "E[f]" else f" (for `{f.objective}`)"),
            "Cost evaluations per draw": f"`{pretty_count(f.evaluations)}`",
            "Cost": "differentiable" if f.differentiable_cost else "any (black box)",
            "Measured variance": measured(f.benchmark),
            "Paper": f.paper,
            "Storchastic": st,
        })
    return rows


class EstimatorTable(Directive):
    """``.. estimator-table::`` (MyST: ```` ```{estimator-table} ````), option ``:family: <module name>``."""
    has_content = False
    option_spec = {"family": directives.unchanged}

    def run(self):
        fam = self.options.get("family")
        if fam is not None and fam not in FAMILY_TITLES:
            raise self.error(f"estimator-table: unknown family {fam!r}; one of {sorted(FAMILY_TITLES)}")
        rows = estimator_rows(fam)
        if not rows:
            raise self.error(f"estimator-table: no estimator in family {fam!r}")
        cols = list(rows[0])
        if fam is not None:
            cols.remove("Family")
        return parse_table(self, cols, [[r[c] for c in cols] for r in rows])


def parse_table(directive: Directive, header: List[str], rows: List[List[str]]) -> List[nodes.Node]:
    """A MyST ``list-table`` of ``rows`` (cells in MyST Markdown), parsed in the page, in a scrolling wrapper."""
    lines = ["```{list-table}", ":header-rows: 1", ":class: estimator-table", ""]
    for row in [header] + rows:
        lines.append("* - " + row[0])
        lines.extend("  - " + cell for cell in row[1:])
    lines.append("```")
    node = nodes.container(classes=["estimator-table-wrapper"])
    directive.state.nested_parse(StringList(lines, source="fastgrad_docs"), directive.content_offset, node)
    return [node]


class OpTable(Directive):
    """``.. op-table::``: every registered ``torch.ops.fastgrad`` op, read off ``fastgrad.ops._registry``."""
    has_content = False

    def run(self):
        from fastgrad.ops._registry import REGISTRY
        names = {"cpp": "C++ (CPU)", "cuda": "CUDA", "triton": "Triton"}
        rows = []
        for name, op in REGISTRY.items():
            kernels = ", ".join(names[k] for k in op.kernels) or "none: the LM-head driver over C++/Triton row passes"
            dtypes = ", ".join(str(d).replace("torch.", "") for d in op.dtypes)
            rows.append([f"`torch.ops.fastgrad.{name}`", f"`{op.schema}`", kernels, dtypes,
                         "yes" if op.differentiable else "no"])
        return parse_table(self, ["op", "schema", "fused kernels", "dtypes", "autograd"], rows)


def copy_result_plots(app, config) -> None:
    dest = os.path.join(app.srcdir, "_static", "results")
    os.makedirs(dest, exist_ok=True)
    for png in glob.glob(os.path.join(RESULTS, "*.png")):
        target = os.path.join(dest, os.path.basename(png))
        if not os.path.exists(target) or os.path.getmtime(target) < os.path.getmtime(png):
            shutil.copy2(png, target)


def setup(app):
    app.add_directive("estimator-table", EstimatorTable)
    app.add_directive("op-table", OpTable)
    app.connect("config-inited", copy_result_plots)
    app.add_css_file("fastgrad.css")
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
