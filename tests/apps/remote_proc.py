"""The processor side of `tests.apps.remote_conf` for `oncely run` in a
subprocess (kill -9 tests): the app name from REMOTE_CONF_APP, the endpoint
from ONCELY_DEPLOYMENTS, signing from ONCELY_SIGNING_SECRET."""

import os

from tests.apps.remote_conf import build

app = build(os.environ["REMOTE_CONF_APP"], remote=True, commit_interval=0.05)
