"""``python -m server serve ...``: the server without the ``restune`` dispatcher."""

from server.cli import main

raise SystemExit(main())
