"""The language the course speaks to the learner: notebooks, hints and check verdicts.

`NSA_TUTORIAL_LANG` (set by `make lab COURSE_LANG=zh`) names it; English is the default
and the fallback. The words of the verdicts are written in English in the code, as
templates passed to `say`; `translations/<lang>/verdicts.json` maps each template (and
each known mistake's text) to its translation, and a test fails when a template has none.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

LANGUAGE_SETTING = "NSA_TUTORIAL_LANG"
ROOT = Path(__file__).resolve().parents[2]
TRANSLATIONS = ROOT / "translations"
LEARNER_FOLDERS = {"en": ROOT / "notebooks", "zh": ROOT / "notebooks_zh"}  # per language
LANGUAGES = tuple(LEARNER_FOLDERS)


def course_language() -> str:
    """NSA_TUTORIAL_LANG if it names a language the course has, else "en"."""
    language = os.environ.get(LANGUAGE_SETTING, "en")
    return language if language in LANGUAGES else "en"


def learner_folder() -> Path:
    """The folder of the learner's notebooks in the course's language."""
    return LEARNER_FOLDERS[course_language()]


@cache
def translated_texts(language: str) -> dict[str, str]:
    """English text -> its translation, for the verdicts of `language` ({} for English)."""
    path = TRANSLATIONS / language / "verdicts.json"
    if language == "en" or not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def translate(text: str) -> str:
    """`text` in the course's language where it has a translation, else as it is."""
    return translated_texts(course_language()).get(text, text)


def say(template: str, **values: object) -> str:
    """A verdict's words: `template` in the course's language, filled in with `values`."""
    return translate(template).format(**values)
