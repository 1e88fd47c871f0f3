"""The tab's words: one-line help for every setting (Gradio `info=`), and the form's names for the
settings that messages written for the CLI/API call by their field or flag names. No Gradio here."""

from __future__ import annotations

import difflib
import re

from ..errors import ConfigError

# One line each, in words an artist understands, with the usual range where there is one.
HELP = {
    "folder": "The folder with your pictures (JPEG, PNG, WEBP). Nothing in it is changed except the "
              ".txt captions you edit or the tagger writes.",
    "recursive": "Also use pictures in folders inside this one.",
    "upload": "Or drop pictures (and their .txt captions) here; they are copied to the trainer's own folder.",
    "caption": "The words that describe this picture, separated by commas. Describe what changes between "
               "pictures; what you leave out is what the LoRA learns to add by itself.",
    "tagger_model": "The WD14 model that suggests tags (downloaded once), or a folder holding model.onnx and "
                    "selected_tags.csv.",
    "tag_mode": "What to do with pictures that already have a caption (see the explanation below).",
    "general_threshold": "How sure the tagger must be before it writes a tag. Lower = more tags, more mistakes. "
                         "Usual: 0.3–0.4.",
    "character_threshold": "The same for character names. Usual: 0.8–0.9, so unknown faces are not named.",
    "trigger": "A rare made-up word (e.g. ohwx) put first in every caption. You write it in your prompt to call "
               "up what the LoRA learned. It is also used as the concept name in step 3.",
    "exclude": "Tags the tagger must never write, comma-separated (e.g. tags for things every picture has).",
    "bulk_action": "Add a tag to every caption (at the end or first), remove it everywhere, or replace it.",
    "bulk_tag": "The tag to add, remove or replace, exactly as in the captions.",
    "bulk_new": "For replace: the tag that takes its place.",
    "concept": "The name of what you teach, usually your trigger word, optionally with its class "
               "(e.g. 'ohwx dog'). It becomes the activation text of the LoRA.",
    "repeats": "How often each picture is seen per epoch. 0 = chosen for you (about 200 views per epoch). "
               "Usual: 5–20 for 10–40 pictures.",
    "prepare_out": "Where the prepared copy of your dataset goes. Empty = the trainer's own folder (recommended).",
    "class_images": "Optional: a folder of generic pictures of the same kind (e.g. other dogs) that keep the "
                    "model from forgetting what the class looks like. Leave empty if unsure.",
    "class_name": "What those generic pictures show, in one or two words (e.g. 'dog').",
    "preset": "A group of settings sized for your GPU's memory. Pick the one that matches your model "
              "(SD1.5 or SDXL) and your card.",
    "name": "The file name of your LoRA. You will write <lora:name:0.8> in your prompt.",
    "data": "The prepared dataset (filled in by step 3). It holds an img/ folder with <repeats>_<concept> inside.",
    "leak_check": "Pictures of other subjects with same-named .txt captions, never trained on; the report uses them "
                  "to tell whether the LoRA leaks into other prompts. Empty = not used.",
    "model_file": "The checkpoint (.safetensors) to train on. Inside a WebUI the loaded model is used instead.",
    "epochs": "How many times the whole dataset is gone through. Usual: 5–20. More = stronger, risk of copying "
              "your pictures too closely.",
    "max_steps": "Stop after this many training steps instead of counting epochs. 0 = use epochs.",
    "batch_size": "Pictures learned from at once. Higher is faster per picture but needs more GPU memory. Usual: 1–4.",
    "resolution": "The size pictures are trained at: 512 for SD1.5, 1024 for SDXL. Lower trains faster but "
                  "blurrier.",
    "rank": "How much the LoRA can hold. Usual: 8–32 (16 is a good start); higher = bigger file, more detail "
            "and more risk of copying.",
    "alpha": "Scales how strongly the LoRA learns. Usual: half the rank (e.g. 8 for rank 16).",
    "learning_rate": "How big each learning step is. Usual: 0.0001 (1e-4). Too high = washed-out or noisy "
                     "results; too low = learns nothing.",
    "seed": "Starting point of the randomness; the same seed and settings give the same LoRA.",
    "train_te": "Also teach the part that reads your prompt. Helps the trigger word stick; needs more memory.",
    "sample_prompts": "Prompts to draw test pictures with while training, one per line (include your trigger "
                      "word). Empty = no test pictures.",
    "sample_every": "Draw the test pictures every N epochs.",
    "subdir": "A sub-folder of the WebUI's Lora folder for the finished LoRA (empty = the Lora folder itself).",
    "extra": 'Any other setting by its name, as JSON, e.g. {"noise_offset": 0.05}. For experienced users.',
    "runs": "Stopped runs that can go on where they stopped.",
}

# TrainConfig fields the form shows, by the form's label (messages name these instead of --flags).
FORM_LABELS = {
    "epochs": "Epochs", "max_steps": "Max steps", "batch_size": "Batch size", "resolution": "Resolution",
    "rank": "Rank", "alpha": "Alpha", "learning_rate": "Learning rate", "seed": "Seed", "name": "LoRA name",
    "data": "Training data", "model": "Checkpoint file", "sample_prompts": "Sample prompts",
    "sample_every_n_epochs": "Sample every N epochs", "train_text_encoder": "Train the text encoder",
    "lora_subdir": "Sub-folder of the Lora folder", "leak_check_dir": "Leak-check folder",
}

_FLAG_REMEDIES = [  # CLI/API wording -> the form's, for messages raised below the tab
    (r"set --epochs or --max-steps to at least 1", "set **Epochs** (or **Max steps**) to at least 1"),
    (r"pass --data with the folder holding img/", "prepare the dataset in step 3 (it fills in **Training data**)"),
    (r"pass --model with a [^;.]*", "type a checkpoint in **Checkpoint file**"),
    (r"\(or pass --model [^)]*\)", ""),
    (r"set \"model\" in the request", "type a checkpoint in **Checkpoint file**"),
    (r"add --sample-prompt", "add a line to **Sample prompts**"),
    (r"use --device cpu or install CUDA torch", "install a CUDA build of torch"),
    (r"or pass --overwrite", ""),
]


def form_message(e: BaseException | str, *, bold: bool = True) -> str:
    """A message for the form: field and flag names become the form's labels ("rank must be at least 1"
    -> "**Rank** must be at least 1"); anything the form has no field for keeps its setting name.
    bold=False: plain text (for HTML)."""
    text = e if isinstance(e, str) else str(e)
    for pattern, repl in _FLAG_REMEDIES:
        text = re.sub(pattern, repl, text)
    text = _labels(text)
    return text if bold else text.replace("**", "")


def _labels(text: str) -> str:
    for field, label in FORM_LABELS.items():
        text = re.sub(rf"--{field.replace('_', '-')}\b", f"**{label}**", text)
        if "_" in field:  # a snake_case name is never an ordinary word
            text = re.sub(rf"(?<![\w\-*]){re.escape(field)}(?![\w\-*])", f"**{label}**", text)
        else:  # plain words only where a sentence is about the setting ("rank must be at least 1")
            text = re.sub(rf"(^|[;.] |\(|\band |\bset ){field}(?= (must|cannot|is|and|\())", rf"\1**{label}**", text)
    return re.sub(r" +([;.,])", r"\1", text).strip()


def check_extra_keys(keys: list[str], known: set[str], forbidden: dict[str, str]) -> None:
    """Refuse unknown or host-decided names in "More settings" with the closest real name, not a list
    of every setting."""
    for key in keys:
        if key in forbidden:
            raise ConfigError(f"More settings: '{key}' cannot be set here ({forbidden[key]}); remove it.")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "check its spelling (the names are kohya's)."
            raise ConfigError(f"More settings: '{key}' is not a setting; {hint}")
