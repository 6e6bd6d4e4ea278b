// The job API, as the board uses it. Every error answer is {"error": {"code", "message"}}.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function client(base, token) {
  const call = async (method, path, body) => {
    const response = await fetch(`${base}${path}`, {
      method,
      headers: {
        authorization: `Bearer ${token}`,
        ...(body ? { "content-type": "application/json" } : {}),
      },
      body: body ? JSON.stringify(body) : undefined,
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      throw new ApiError(response.status, data.error?.code ?? "http_error", data.error?.message ?? response.statusText);
    }
    return data;
  };
  return {
    generate: (kind, body) => call("POST", `/api/generate/${kind}`, body),
    status: (id) => call("GET", `/api/generate/status/${id}`),
    cancel: (id) => call("POST", `/api/generate/cancel/${id}`),
  };
}
