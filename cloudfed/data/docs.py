"""Data Docs that a party's steward can read offline and that say what the contract policy did.

GX renders Data Docs for a world with a network: its pages load Bootstrap, Font Awesome, jQuery
and bootstrap-table from CDNs, its index fills its table with bootstrap-table at load time, and a
page's status is GX's ``success``, so a rows suite whose failing rows were quarantined reads
"Failed" although the run accepted the data. A party's cloud often has no route to those CDNs,
and a steward who reads "Failed" next to a successful run stops trusting the page.

So the site is built with GX's own extension points (renderer, index builder and table renderer
classes named in the site configuration) and then made self-contained:

* every expectation row carries its policy (``block`` / ``quarantine`` / ``warn``) and its
  ``why`` in two more columns; a failure whose rows were
  quarantined (or that only warns) gets its own icon instead of the red cross of a block;
* each page's Status and the index say *passed*, *quarantined*, *warned* or *blocked*;
* the index is a static table, so it lists its validations without scripts;
* CDN tags are removed and one local stylesheet (`OFFLINE_CSS`, written next to the GX assets
  the site already copies) styles the layout and the status icons; links to GX's own static
  files are rewritten relative to each page.

The pages hold counts and verdicts only (see `docs_result`) and stay in the party's storage.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from great_expectations.render import (
    RenderedStringTemplateContent,
    RenderedTableContent,
)
from great_expectations.render.renderer.content_block.validation_results_table_content_block import (  # noqa: E501
    ValidationResultsTableContentBlockRenderer,
)
from great_expectations.render.renderer.page_renderer import ValidationResultsPageRenderer
from great_expectations.render.renderer.site_builder import DefaultSiteIndexBuilder
from great_expectations.render.renderer.site_index_page_renderer import SiteIndexPageRenderer

from cloudfed.data.contracts import DOCS_KEYS, Tally, label_of

STYLESHEET = "static/styles/cloudfed-offline.css"
META_KEY = "cloudfed"  # where a result's policy verdict lives in its meta

# verdict -> (icon classes, what the Status says). The first two icons are GX's own.
VERDICTS: dict[str, tuple[str, str]] = {
    "passed": ("fas fa-check-circle text-success", "Passed"),
    "quarantined": ("fas fa-filter text-warning cf-quarantined", "Accepted, rows quarantined"),
    "warned": ("fas fa-exclamation-circle text-warning cf-warned", "Accepted with warnings"),
    "blocked": ("fas fa-times text-danger cf-blocked", "Blocked"),
}
# A failed expectation's state by its policy (a passed one is "passed").
_STATE = {"quarantine": "quarantined", "warn": "warned", "block": "blocked"}


def _icon(state: str) -> RenderedStringTemplateContent:
    return RenderedStringTemplateContent(
        content_block_type="string_template",
        string_template={
            "template": "$icon",
            "params": {"icon": ""},
            "styling": {
                "params": {
                    "icon": {
                        "tag": "i",
                        "classes": VERDICTS[state][0].split(),
                        "attributes": {"title": VERDICTS[state][1]},
                    }
                }
            },
        },
    )


def _verdict(result: Any) -> dict[str, Any]:
    return dict((result.meta or {}).get(META_KEY) or {})


def _status_text(verdict: dict[str, Any]) -> str:
    state = verdict.get("verdict", "passed")
    text = VERDICTS[state][1]
    if state == "quarantined" and verdict.get("quarantined_rows") is not None:
        text = f"Accepted, {verdict['quarantined_rows']} rows quarantined"
    return text


class PolicyTableRenderer(ValidationResultsTableContentBlockRenderer):
    """GX's expectation table plus Policy and Why columns, and the policy's own icons.

    (GX's ``meta_properties_to_render`` would add columns, but GX 1.x expectation models
    reject it as an unknown keyword, so the columns are added here.)
    """

    @classmethod
    def _process_content_block(
        cls, content_block: Any, has_failed_evr: bool, render_object: Any = None
    ) -> None:
        super()._process_content_block(content_block, has_failed_evr, render_object)
        content_block.header_row = [*content_block.header_row, "Policy", "Why"]

    @classmethod
    def _get_content_block_fn(  # type: ignore[override]
        cls, expectation_type: str, expectation_config: Any = None
    ) -> Any:
        rows_fn = super()._get_content_block_fn(
            expectation_type=expectation_type, expectation_config=expectation_config
        )
        if rows_fn is None:
            return None

        def rows(*args: Any, result: Any = None, **kwargs: Any) -> Any:
            out = rows_fn(*args, result=result, **kwargs)
            note = (result.expectation_config.meta or {}).get(META_KEY, {}) if result else {}
            state = note.get("state")
            if result is not None and not result.success and state in ("quarantined", "warned"):
                out[0][0] = _icon(state)
            out[0] = [*out[0], note.get("policy", "--"), note.get("why", "--")]
            return out

        return rows


class PolicyValidationResultsPageRenderer(ValidationResultsPageRenderer):
    """A validation page whose Status is the policy's verdict, not GX's bare success."""

    def __init__(self, data_context: Any = None, **kwargs: Any) -> None:
        super().__init__(
            column_section_renderer={
                "class_name": "ValidationResultsColumnSectionRenderer",
                "table_renderer": {
                    "module_name": __name__,
                    "class_name": PolicyTableRenderer.__name__,
                },
            },
            data_context=data_context,
            **kwargs,
        )

    @classmethod
    def _render_validation_header(cls, validation_results: Any) -> Any:
        header = super()._render_validation_header(validation_results)
        verdict = _verdict(validation_results)
        state = verdict.get("verdict") or ("passed" if validation_results.success else "blocked")
        template = header.subheader.string_template
        template["template"] = (
            "${suite_title} ${expectation_suite_name}\n ${status_title} ${html_success_icon} "
            "${success}\n ${policy_title} ${policy}"
        )
        template["params"].update(
            success=_status_text({**verdict, "verdict": state}),
            html_success_icon=(
                f'<i class="{VERDICTS[state][0]}" aria-hidden="true" '
                f'title="{VERDICTS[state][1]}"></i>'
            ),
            policy_title="Policy:",
            policy=verdict.get("summary", ""),
        )
        styling = template["styling"]["params"]
        styling["policy_title"] = {"classes": ["h6"]}
        # The suite pages are not part of a party's site: no link to a page that is not there.
        styling.pop("expectation_suite_name", None)
        return header


class PolicySiteIndexBuilder(DefaultSiteIndexBuilder):
    """GX's index builder, with each validation's policy verdict next to its link."""

    def _add_validations_to_index_links(self, index_links_dict: Any, keys: Any) -> None:
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        super()._add_validations_to_index_links(index_links_dict, keys)
        store = self.data_context.validation_results_store
        for link in index_links_dict.get("validations_links", []):
            key = ValidationResultIdentifier(
                expectation_suite_identifier=ExpectationSuiteIdentifier(
                    name=link["expectation_suite_name"]
                ),
                run_id=link["run_id"],
                batch_identifier=link["batch_identifier"],
            )
            link[META_KEY] = _verdict(store.get(key))


class StaticSiteIndexPageRenderer(SiteIndexPageRenderer):
    """The index as a plain HTML table: GX's is filled by bootstrap-table from a CDN."""

    @classmethod
    def _generate_validation_results_link_table(cls, index_links_dict: Any) -> Any:
        def text(value: str, **styling: Any) -> RenderedStringTemplateContent:
            return RenderedStringTemplateContent(
                content_block_type="string_template",
                string_template={"template": "$value", "params": {"value": value}, **styling},
            )

        rows = []
        links = sorted(
            index_links_dict.get("validations_links", []),
            key=lambda d: (d["expectation_suite_name"], str(d["batch_identifier"])),
        )
        for link in links:
            verdict = link.get(META_KEY) or {}
            state = verdict.get("verdict") or (
                "passed" if link["validation_success"] else "blocked"
            )
            status = RenderedStringTemplateContent(
                content_block_type="string_template",
                string_template={
                    "template": "$icon $label",
                    "params": {"icon": "", "label": _status_text({**verdict, "verdict": state})},
                    "styling": {
                        "classes": ["cf-index-status"],
                        "params": {
                            "icon": {"tag": "i", "classes": VERDICTS[state][0].split()},
                        },
                    },
                },
            )
            page = text(
                str(link["batch_identifier"]),
                tag="a",
                styling={
                    "attributes": {"href": link["filepath"]},
                    "classes": ["cf-index-link"],
                },
            )
            rows.append(
                [
                    status,
                    text(link["expectation_suite_name"]),
                    page,
                    text(str(cls._get_formatted_datetime(link.get("run_time")) or "")),
                ]
            )
        return RenderedTableContent(
            header_row=["Status", "Expectation Suite", "Validation", "Run Time"],
            table=rows,
            styling={
                "classes": ["col-12", "ge-index-page-table-container"],
                "body": {"classes": ["table", "table-sm", "cf-index-table"]},
            },
        )


def _policy_text(tally: Tally) -> str:
    policy = tally.expectation.on_failure
    if tally.success:
        return policy
    if policy == "quarantine":
        return f"quarantine: {tally.unexpected} rows set aside, the run goes on"
    if policy == "warn":
        return "warn: recorded, the run goes on"
    return "block: the run stops"


def docs_result(
    template: Any, tallies: dict[str, Tally], suite_name: str, *, quarantined_rows: int = 0
) -> Any:
    """A GX result for the whole split, built from one chunk's result and the summed tallies.

    Data Docs then show each expectation's verdict and counts over all chunks, with its policy
    and `why`, and the page's verdict under the policy; row numbers and values are dropped so
    the page is safe to keep beside the data.
    """
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResult,
    )

    results = []
    for r in template.results:
        t = tallies[label_of(r)]
        res = {k: v for k, v in (r.result or {}).items() if k in DOCS_KEYS}
        if "element_count" in res:
            n = max(t.evaluated, 1)
            nonmissing = max(t.evaluated - t.missing, 1)
            res.update(
                element_count=t.evaluated,
                unexpected_count=t.unexpected,
                unexpected_percent=100.0 * t.unexpected / nonmissing,
                unexpected_percent_total=100.0 * t.unexpected / n,
                unexpected_percent_nonmissing=100.0 * t.unexpected / nonmissing,
                missing_count=t.missing,
                missing_percent=100.0 * t.missing / n,
                partial_unexpected_list=[],
            )
        r = copy.copy(r)
        config = copy.deepcopy(r.expectation_config)
        config.meta = {
            **(config.meta or {}),
            META_KEY: {
                "policy": _policy_text(t),
                "why": str(t.expectation.meta.get("why") or "--"),
                "state": "passed" if t.success else _STATE[t.expectation.on_failure],
            },
        }
        r.expectation_config = config
        r.result = res
        r.success = t.success
        results.append(r)
    failed = [t for t in tallies.values() if not t.success]
    by_policy = {p: [t for t in failed if t.expectation.on_failure == p] for p in _STATE}
    # The headline is the strongest consequence; the summary lists them all.
    state = next((_STATE[p] for p in ("block", "warn", "quarantine") if by_policy[p]), "passed")
    parts = []
    if by_policy["block"]:
        parts.append(f"{len(by_policy['block'])} blocking expectation(s) failed: the run stops")
    if by_policy["warn"]:
        parts.append(f"{len(by_policy['warn'])} warning(s), recorded")
    if by_policy["quarantine"]:
        parts.append(
            f"{len(by_policy['quarantine'])} expectation(s) failed on single rows: "
            f"{quarantined_rows} rows set aside in quarantine, the rest accepted"
        )
    ok = sum(r.success for r in results)
    meta = dict(template.meta or {})
    meta[META_KEY] = {
        "verdict": state,
        "quarantined_rows": quarantined_rows if by_policy["quarantine"] else None,
        "summary": "; ".join(parts) or "every expectation passed",
    }
    return ExpectationSuiteValidationResult(
        success=ok == len(results),
        results=results,
        suite_name=suite_name,
        statistics={
            "evaluated_expectations": len(results),
            "successful_expectations": ok,
            "unsuccessful_expectations": len(results) - ok,
            "success_percent": 100.0 * ok / max(len(results), 1),
        },
        meta=meta,
    )


def build_data_docs(results: Iterable[tuple[str, Any]], site_dir: Path) -> list[Path]:
    """Render Data Docs for these (batch label, result) pairs; returns the validation pages.

    A throwaway ephemeral context holds only these results, so the site shows this run and
    nothing else; `make_offline` then makes it readable without a network.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    site_dir = Path(os.path.abspath(site_dir))
    site_dir.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="ephemeral")
    ctx.add_data_docs_site(
        "party",
        {
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(site_dir),
            },
            # The how-to buttons and walkthrough need GX's CDN scripts and point at GX's site.
            "show_how_to_buttons": False,
            "site_index_builder": {
                "module_name": __name__,
                "class_name": PolicySiteIndexBuilder.__name__,
                "renderer": {
                    "module_name": __name__,
                    "class_name": StaticSiteIndexPageRenderer.__name__,
                },
            },
            "site_section_builders": {
                "expectations": "0",  # a party's site documents its validations only
                "profiling": "0",
                "validations": {
                    "renderer": {
                        "module_name": __name__,
                        "class_name": PolicyValidationResultsPageRenderer.__name__,
                    }
                },
            },
        },
    )
    keys = []
    for label, res in results:
        key = ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=res.suite_name),
            run_id=res.meta["run_id"],
            batch_identifier=label,
        )
        ctx.validation_results_store.set(key, res)
        keys.append(key)
    ctx.build_data_docs(site_names=["party"], resource_identifiers=keys)
    make_offline(site_dir)
    pages = []
    for key in keys:
        url = ctx.get_docs_sites_urls(resource_identifier=key, site_name="party")[0]["site_url"]
        if url is None:  # GX logs a renderer's exception and skips the page
            raise RuntimeError(
                f"{site_dir}: GX did not render the Data Docs page of {key.to_tuple()}; "
                "its error is in the log above"
            )
        pages.append(Path(url.removeprefix("file://")))
    return pages


_CDN_LINK = re.compile(r"<link\b[^>]*\bhref=\"https?://[^\"]*\"[^>]*>\s*", re.I)
_CDN_SCRIPT = re.compile(r"<script\b[^>]*\bsrc=\"https?://[^\"]*\"[^>]*>\s*</script>\s*", re.I)
_REMOTE_LOGO = re.compile(
    r"src=\"https?://great-expectations-web-assets[^\"]*/([\w.-]+?)(\?[^\"]*)?\""
)
_STATIC_REF = re.compile(r"(href|src)=\"(?:\./|(?:\.\./)+)static/")


def make_offline(site_dir: Path) -> None:
    """Drop every CDN tag, link the local stylesheet and fix links to GX's static files.

    Links are rewritten relative to each page's real place in the site, so the site works from
    any folder, copied as a whole, opened straight from disk.
    """
    site_dir = Path(site_dir)
    css = site_dir / STYLESHEET
    css.parent.mkdir(parents=True, exist_ok=True)
    css.write_text(OFFLINE_CSS, encoding="utf-8")
    for page in site_dir.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        static = Path(os.path.relpath(site_dir / "static", page.parent)).as_posix() + "/"
        html = _CDN_LINK.sub("", html)
        html = _CDN_SCRIPT.sub("", html)
        html = _REMOTE_LOGO.sub(rf'src="{static}images/\1"', html)
        html = _STATIC_REF.sub(rf'\1="{static}', html)
        if "cloudfed-offline.css" not in html:  # a page kept from an earlier build has it
            link = f'<link rel="stylesheet" href="{static}styles/cloudfed-offline.css">\n'
            html = html.replace("</head>", link + "</head>", 1)
        page.write_text(html, encoding="utf-8")


# The part of Bootstrap 4 and Font Awesome that GX's pages use, written for these pages only:
# layout, tables, badges, alerts and the status icons (as Unicode glyphs, no icon font).
OFFLINE_CSS = """\
/* cloudfed: offline styles for GX Data Docs (no CDN). */
*, ::before, ::after { box-sizing: border-box; }
body { margin: 0; font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans",
  sans-serif; font-size: 0.95rem; line-height: 1.5; color: #212529; background: #fff; }
a { color: #0062cc; text-decoration: none; } a:hover { text-decoration: underline; }
h4, h5, h6, .h6 { margin: 0 0 0.5rem; font-weight: 600; line-height: 1.2; }
h4 { font-size: 1.4rem; } h5 { font-size: 1.2rem; } h6, .h6 { font-size: 1rem; }
.lead { font-size: 1.05rem; color: #555; }
.navbar { display: flex; align-items: center; padding: 0.5rem 1rem; background: #fff;
  border-bottom: 1px solid #dee2e6; }
.navbar img { height: 40px !important; }
.sticky-top { position: sticky; top: 0; z-index: 1020; }
.breadcrumb { display: flex; list-style: none; margin: 0 0 0 1rem; padding: 0.4rem 0.8rem;
  background: #f8f9fa; border-radius: 4px; }
.breadcrumb-item + .breadcrumb-item::before { content: "/"; padding: 0 0.5rem; color: #6c757d; }
.d-none { display: none !important; }
.d-flex { display: flex; }
.container-fluid { width: 100%; padding: 1.5rem 2rem; }
.row { display: flex; flex-wrap: wrap; margin: 0 -0.75rem; }
.row > * { padding: 0 0.75rem; }
.col-12 { flex: 0 0 100%; max-width: 100%; }
.col-6 { flex: 0 0 50%; max-width: 50%; }
@media (min-width: 768px) {
  .col-md-2 { flex: 0 0 16.666%; max-width: 16.666%; }
  .col-md-10 { flex: 0 0 83.333%; max-width: 83.333%; }
  .d-md-block { display: block !important; }
  .d-md-inline-flex { display: inline-flex !important; }
}
.card { border: 1px solid #dee2e6; border-radius: 4px; margin-bottom: 1rem; }
.card-header { padding: 0.5rem; background: #f8f9fa; border-bottom: 1px solid #dee2e6; }
.card-body { padding: 0.75rem; }
.alert { padding: 0.75rem 1rem; margin-bottom: 1rem; border-radius: 4px; }
.alert-secondary { background: #e2e3e5; color: #383d41; border: 1px solid #d6d8db; }
.table { width: 100%; margin-bottom: 1rem; border-collapse: collapse; }
.table th, .table td { padding: 0.5rem; vertical-align: top; border-top: 1px solid #dee2e6;
  text-align: left; }
.table thead th { border-bottom: 2px solid #dee2e6; }
.table-sm th, .table-sm td { padding: 0.3rem; }
.table-responsive { overflow-x: auto; }
.badge { display: inline-block; padding: 0.2em 0.45em; font-size: 80%; font-weight: 600;
  border-radius: 4px; white-space: normal; word-break: break-all; }
.badge-secondary { background: #6c757d; color: #fff; }
.badge-primary { background: #007bff; color: #fff; }
.badge-info { background: #17a2b8; color: #fff; }
.badge-warning { background: #ffc107; color: #212529; }
.text-success { color: #1e7e34 !important; }
.text-danger { color: #c82333 !important; }
.text-warning { color: #b36b00 !important; }
.nav { display: flex; flex-wrap: wrap; list-style: none; padding: 0; margin: 0; }
.nav-link { display: block; padding: 0.3rem 0.6rem; }
.nav-tabs { border-bottom: 1px solid #dee2e6; margin-bottom: 0.5rem; }
/* Parts that need GX's CDN scripts (filters, modals) or advertise GX's cloud. */
.btn, .btn-group, .sticky > .card.mb-3, .ge-walkthrough-modal, footer { display: none !important; }
.show-scrollbars { overflow-wrap: break-word; }
/* Collapsed blocks stay open without GX's scripts, so the toggle has nothing to do. */
a[data-toggle="collapse"] { display: none; }
/* Status icons: Font Awesome's classes, drawn with Unicode glyphs. */
.fas { display: inline-block; min-width: 1.1em; font-style: normal; font-weight: 700;
  text-align: center; line-height: 1; }
.fas::before { font-family: "DejaVu Sans", "Segoe UI Symbol", "Noto Sans Symbols",
  sans-serif; }
.fa-check-circle::before { content: "\\2714"; }
.fa-times::before { content: "\\2716"; }
.fa-filter::before { content: "\\2691"; }
.fa-exclamation-circle::before, .fa-exclamation-triangle::before { content: "\\26A0"; }
.fa-question-circle::before { content: "?"; }
.cf-index-status { white-space: nowrap; }
"""
