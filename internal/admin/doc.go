// Package admin serves the coordinator's operator surface over HTTP: the admin REST API under
// /admin/v1 (list, get, statistics, workflows and operator actions on transactions), its OpenAPI
// document at /admin/v1/openapi.json, and the dashboard under /ui/, a few embedded static files
// that call the same API from the browser.
//
// # Authentication
//
// Every /admin/v1 route except the OpenAPI document needs "Authorization: Bearer TOKEN". A token
// has a role: viewer (read) or operator (read and act). No or an unknown token answers 401, a
// viewer asking for an action 403. Tokens come from ParseTokens (the TREATY_ADMIN_TOKENS
// variable) and ReadTokensFile (--admin-tokens-file); a Token never prints its secret, so logging
// one by mistake leaks nothing. Config.Open lets everyone act without a token, for dev mode only.
//
// The dashboard's files hold no data and are served without a token; the page asks for a token
// and keeps it in the tab's sessionStorage, sending it on every API call.
//
// # Errors
//
// Every error is JSON: {"code": "...", "message": "...", "field": "..."}, with the code taken
// from one table (see errorCodes) so that clients can rely on it.
package admin
