// The API docs: Swagger UI (from the swagger-ui-bundle package, served by the app) over /openapi.json.
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui" });
});
