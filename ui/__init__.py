"""The search page's user interface (Gradio): shared display code (``display``) and the Whole slide
tab (``slide_tab``). ``app.py`` composes the tabs; the retrieval core (``index_build``) never
imports this package or Gradio."""
