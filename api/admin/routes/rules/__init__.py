"""Rules: the list, the editor with live validation, the test panel, preview,
forecast, version diff and shadow, activation with approval, and history.

Every read and write of a rule goes through ``services.rules`` (RuleService) —
the same calls the REST API makes. One module per page:

* :mod:`.listing`: the list of rules, the approvals waiting;
* :mod:`.editor`: a new rule, saving versions, live validation while editing;
* :mod:`.preview`: the test panel and the launch page (preview, forecast, diff, shadow);
* :mod:`.activation`: blast radius, activation requests, approve/decline, pause;
* :mod:`.rollout`: canary rollout: share, promote, roll back;
* :mod:`.history`: a rule's history, the guide;
* :mod:`.experiment`: conversions per arm with intervals, uplift, verdict.
"""

from __future__ import annotations

# Importing a page's module registers its routes on the area's one router.
from api.admin.routes.rules import (  # noqa: F401
    activation,
    editor,
    experiment,
    history,
    listing,
    preview,
    rollout,
)
from api.admin.routes.rules.common import router

__all__ = ["router"]
