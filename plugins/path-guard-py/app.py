"""`path-guard-py`: refuse requests under configured path prefixes (403), and
tag the others upstream and in the access log. Written in Python with the
`sluice` helper module, built by componentize-py.

Config: `{"blocked": ["/admin", "/internal"]}`.
"""

from typing import List, Optional

from sluice import Fields, Plugin, Request, allow, deny, export


class PathGuard(Plugin):
    def __init__(self, config: dict):
        blocked = config.get("blocked", [])
        if not isinstance(blocked, list) or not all(
            isinstance(p, str) and p.startswith("/") for p in blocked
        ):
            raise ValueError("`blocked` must be a list of paths starting with '/'")
        self.blocked = blocked

    def headers(self) -> Optional[List[str]]:
        return []

    def fields(self) -> Optional[Fields]:
        return Fields.PATH

    def on_request(self, req: Request):
        path = req.path()
        for prefix in self.blocked:
            if path.startswith(prefix):
                return deny(403, "forbidden\n").log_field("blocked", prefix).reuse_for(60)
        return allow().set_header("x-path-guard", "passed").reuse_for(60)


WitWorld = export(PathGuard)
