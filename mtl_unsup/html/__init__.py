"""``report.html``: a run's clusters as one static page (see :func:`write_report`)."""

from mtl_unsup.html.content import ReportInputs
from mtl_unsup.html.page import write_report

__all__ = ["ReportInputs", "write_report"]
