"""Step 3 of the tab: prepare the dataset (Kohya folders) from the loaded pictures.
`handlers(ctx)` gives the Gradio event functions; `tab.build_tab` wires them.
"""

# Handlers catch every exception on purpose: the tab shows the message (error_md), and
# logic.user_error logs the traceback of anything that is not a LoraTrainerError.
# ruff: noqa: BLE001

from functools import partial
from types import SimpleNamespace

import gradio as gr

from .. import actions
from ..errors import ConfigError
from ..jobs import FINAL_STATES
from . import logic
from .tab_results import follow, job_status
from .tab_shared import TabContext, error_md


def handlers(ctx: TabContext) -> SimpleNamespace:
    """The prepare step's event functions for one tab."""
    jobs = ctx.jobs
    _follow, _job_status = partial(follow, jobs), job_status

    def steps_info(images, repeats, epochs, batch, max_steps):
        try:
            text = logic.steps_text(len(images or []), int(repeats or 0), int(epochs or 1), int(batch or 1))
            if int(max_steps or 0) > 0 and images:
                text += f" Max steps is set: training stops after {int(max_steps)} steps."
            return text
        except Exception as e:
            return error_md(e)

    def run_prepare(folder, concept, repeats, class_images, class_name, out_dir, resolution):
        try:
            concept = (concept or "").strip()
            if not (folder or "").strip():
                raise ConfigError("No picture folder is loaded; load your pictures in step 1 first.")
            if not concept:
                raise ConfigError("The concept is empty; type it in **Concept** (usually your trigger word, "
                                  "e.g. 'ohwx dog').")
            if (class_images or "").strip() and not (class_name or "").strip():
                raise ConfigError("Generic pictures are given without their class; type it in **Their class** "
                                  "(e.g. 'dog').")
            out = (out_dir or "").strip() or str(jobs.work_dir / "datasets" / concept)
            params = {"source": folder, "out": out, "concept": concept,
                      "repeats": int(repeats) if repeats else None, "resolution": int(resolution or 512)}
            if (class_images or "").strip():
                params.update(class_images=class_images.strip(), class_name=class_name.strip())
            job = actions.submit_prepare(jobs, params)
        except Exception as e:
            yield error_md(e), gr.update()
            return
        snap = None
        for snap in _follow(job.id):
            if snap["state"] not in FINAL_STATES:
                yield _job_status(snap), gr.update()
        if snap["state"] != "done":
            yield _job_status(snap), gr.update()
            return
        result = snap["result"] or {}
        manifest = result.get("manifest") or {}
        counts = manifest.get("counts") or {}
        subsets = [s for s in manifest.get("subsets") or [] if s.get("kind") == "img"]
        used_repeats = int(subsets[0].get("repeats") or 1) if subsets else int(repeats or 1)
        text = f"Prepared `{result.get('data', out)}`"
        if counts:
            text += f": {counts.get('usable', '?')} picture(s), {counts.get('captioned', '?')} with captions"
        other = [k for k, v in (manifest.get("problems") or {}).items()
                 if any("small image" not in str(x) for x in v)]
        if other:
            text += f"; {len(other)} file(s) converted, renamed or skipped (listed in dataset.json)"
        yield (f"{text} ({used_repeats} repeats per picture). **Training data** in step 4 is filled in.",
               result.get("data", out))

    return SimpleNamespace(
        steps_info=steps_info, run_prepare=run_prepare,
    )
