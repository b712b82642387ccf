"""Reporting: figures and text (``plots``), a run's report.html/.md (``report``) and Grad-CAM
panels (``gradcam``). Views of what a run saved; regenerating them changes no result.
"""
