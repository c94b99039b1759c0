"""A stand-in for the Hugging Face Hub (unreachable here) on 127.0.0.1: the few endpoints the real
huggingface_hub client uses to create a repo and upload files in one commit. It records what it
received so tests can assert on it."""

from __future__ import annotations

import base64
import http.server
import json
import threading


class FakeHub:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.validated: list[dict] = []
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                # One request per connection: a kept-alive one would hold its handler thread past close()
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization")
                hub.requests.append(("POST", self.path, auth))
                if auth != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    body = json.loads(raw)
                    repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
                    private = body["visibility"] == "private" if "visibility" in body else body.get("private")
                    hub.repos.setdefault(repo_id, {"private": private, "files": {}})
                    return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":  # the client checks a README's metadata before committing
                    hub.validated.append(json.loads(raw))
                    return self._reply(200, {"errors": [], "warnings": []})
                parts = path.split("/")
                if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] == "preupload":
                    files = json.loads(raw)["files"]
                    # Everything "regular": the client inlines the bytes in the commit (no LFS/Xet server).
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False, "oid": None} for f in files]})
                if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] == "commit":
                    repo_id = "/".join(parts[3:5])
                    lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
                    header = next(item["value"] for item in lines if item["key"] == "header")
                    files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                             for item in lines if item["key"] == "file"}
                    hub.repos[repo_id]["files"].update(files)
                    hub.commits.append({"repo_id": repo_id, "summary": header.get("summary"), "files": files})
                    oid = f"{len(hub.commits):040x}"
                    return self._reply(200, {"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{oid}",
                                             "commitOid": oid, "pullRequestUrl": None})
                return self._reply(404, {"error": f"not implemented: {self.path}"})

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
