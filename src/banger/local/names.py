"""What a VM name may be: a DNS label (RFC 1123), since the name becomes ``<name>.vm`` and
the guest's hostname.

The one definition. The model takes it (and through the model the API schema, its
OpenAPI document and the CLI's wording of a refused name); banger's ssh_config
(:mod:`banger.local.sshconfig`), a stdlib leaf that cannot import the model, takes it from
here too.
"""

from __future__ import annotations

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
# The pattern in words, for the messages that refuse a name.
NAME_RULE = "1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"
