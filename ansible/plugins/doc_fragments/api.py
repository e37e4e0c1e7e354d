# Copyright: Isthmus maintainers
# Apache License 2.0 (see the repository's pyproject.toml)

from __future__ import annotations


class ModuleDocFragment:
    # How the modules reach the control API: the options of module_utils' API_ARGUMENT_SPEC.
    DOCUMENTATION = r"""
options:
  api_url:
    description: The control API's URL.
    type: str
    default: http://127.0.0.1:15000
  token:
    description: The API token. Prefer I(token_file), which keeps the token off the controller.
    type: str
  token_file:
    description: A file holding the API token, on the host the module runs on.
    type: path
    default: /etc/isthmus/api-token
  timeout:
    description: Seconds to wait for the API.
    type: int
    default: 10
"""
