-- wrk script: POST /v1/classify with a small text.
wrk.method = "POST"
wrk.body = '{"text": "my invoice shows a billing error"}'
wrk.headers["Content-Type"] = "application/json"
