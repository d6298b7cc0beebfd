// Runs oauth2-mock-server (a real OAuth2 implementation we did not write) over HTTPS for
// Sallyport's tests, logging each token request as one JSON line so tests can count grants
// and see where the client credentials travelled.
// Usage: node server.mjs KEY.pem CERT.pem PORT LOG [EXPIRES_IN] [FAIL_REFRESH=0|1]
import { appendFileSync } from "node:fs";
import { OAuth2Server } from "oauth2-mock-server";

const [key, cert, port, log, expiresIn = "3600", failRefresh = "0"] = process.argv.slice(2);
const server = new OAuth2Server(key, cert);
await server.issuer.keys.generate("RS256");
server.service.on("beforeResponse", (res, req) => {
  const b = req.body ?? {};
  const auth = req.headers.authorization ?? "";
  appendFileSync(log, JSON.stringify({
    grant: b.grant_type,
    basic: auth.startsWith("Basic ") ? Buffer.from(auth.slice(6), "base64").toString() : null,
    clientId: b.client_id ?? null,
    clientSecret: b.client_secret ?? null,
    username: b.username ?? null,
    password: b.password ?? null,
    scope: b.scope ?? null,
    refreshToken: b.refresh_token ?? null,
  }) + "\n");
  if (failRefresh === "1" && b.grant_type === "refresh_token") {
    res.statusCode = 400;
    res.body = { error: "invalid_grant" };
    return;
  }
  res.body.expires_in = parseInt(expiresIn, 10);
});
await server.start(parseInt(port, 10), "127.0.0.1");
console.log("ready");
