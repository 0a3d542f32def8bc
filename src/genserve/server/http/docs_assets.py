"""``/docs`` (Swagger UI) and ``/redoc`` from assets shipped in the package (``static/``), so the
API docs render on a machine without internet access — FastAPI's defaults load them from a CDN."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PREFIX = "/static"
# The pages may load images, fonts and data from this server only: ReDoc's sidebar always shows a
# logo from cdn.redoc.ly, which the browser then never requests (the image hides itself on error).
CSP = "img-src 'self' data:; font-src 'self' data:; connect-src 'self'"


def mount_docs(app: FastAPI) -> None:
    """Call with ``FastAPI(docs_url=None, redoc_url=None)``: adds /static, /docs and /redoc."""
    app.mount(PREFIX, StaticFiles(directory=STATIC), name="static")
    title = f"{app.title} API"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        # validatorUrl None: Swagger UI would otherwise fetch a badge from validator.swagger.io.
        page = get_swagger_ui_html(openapi_url=app.openapi_url, title=title,
                                   swagger_js_url=f"{PREFIX}/swagger-ui/swagger-ui-bundle.js",
                                   swagger_css_url=f"{PREFIX}/swagger-ui/swagger-ui.css",
                                   swagger_favicon_url=f"{PREFIX}/swagger-ui/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})
        page.headers["Content-Security-Policy"] = CSP
        return page

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        page = get_redoc_html(openapi_url=app.openapi_url, title=title,
                              redoc_js_url=f"{PREFIX}/redoc/redoc.standalone.js",
                              redoc_favicon_url=f"{PREFIX}/swagger-ui/favicon-32x32.png", with_google_fonts=False)
        page.headers["Content-Security-Policy"] = CSP
        return page
