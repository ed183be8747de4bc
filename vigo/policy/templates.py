"""Templates: Jinja2 in its sandbox, strict about undefined names.

Templates are rendered on the envoy, against the host's fresh traits, so a cached bundle still
adapts when the host changes while the server is away. The sandbox keeps a template from
reaching Python internals (``{{ ''.__class__ }}`` is refused), and ``StrictUndefined`` turns a
misspelt variable into an error instead of an empty string written to a config file.

The context of every template is three names, never merged, so a trait can't shadow a var:
``traits`` (the host's traits), ``vars`` (the policy's vars) and ``secrets`` (only the secrets
the policy declared).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from vigo.errors import TemplateError


def make_environment(templates: Mapping[str, str]) -> SandboxedEnvironment:
    """One environment per run: compiled templates are cached in it across resources."""
    return SandboxedEnvironment(
        loader=jinja2.DictLoader(dict(templates)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        # Compiled templates stay cached for the whole run, however many a stack has.
        cache_size=-1,
        auto_reload=False,
    )


def check_template(env: SandboxedEnvironment, name: str) -> None:
    """Compile one template; a syntax error names the template and the line."""
    try:
        env.get_template(name)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"template {name!r} line {exc.lineno}: {exc.message} (expected valid Jinja2 syntax)"
        ) from exc


def render(
    env: SandboxedEnvironment,
    name: str,
    *,
    traits: Mapping[str, Any],
    vars: Mapping[str, Any],
    secrets: Mapping[str, str],
) -> str:
    """Render template ``name``. Undefined names, sandbox violations and filters that fail all
    come back as TemplateError saying which template and what went wrong."""
    try:
        template = env.get_template(name)
        return template.render(traits=traits, vars=vars, secrets=secrets)
    except jinja2.TemplateNotFound as exc:
        raise TemplateError(f"template {name!r} is not in the bundle") from exc
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"rendering template {name!r}: {exc.message} (undefined name)") from exc
    except SecurityError as exc:
        raise TemplateError(f"rendering template {name!r}: refused by the sandbox: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise TemplateError(f"rendering template {name!r}: {exc}") from exc
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise TemplateError(
            f"rendering template {name!r}: {type(exc).__name__}: {exc}"
        ) from exc
