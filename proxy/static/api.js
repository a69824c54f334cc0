// The page's only door to the API: the same routes every client uses.
//
// Every failure becomes a ProblemError carrying an RFC 9457 problem document: the server's
// own (application/problem+json, with its stable `code`) or one made here for a network
// failure or an answer that is not a problem document.

export class ProblemError extends Error {
  constructor(problem) {
    super(problem.detail || problem.title || "Request failed");
    this.name = "ProblemError";
    this.problem = problem;
    this.code = problem.code;
    this.status = problem.status;
  }
}

async function problemOf(response) {
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) {
    try {
      const body = await response.json();
      if (body && typeof body.code === "string") return body;
    } catch {
      // not JSON after all: described below
    }
  }
  return {
    status: response.status,
    title: response.statusText || "Error",
    code: `http_${response.status}`,
    detail: `The server answered ${response.status} ${response.statusText}.`.trim(),
  };
}

async function post(path, form, { signal, accept = "application/json" } = {}) {
  let response;
  try {
    response = await fetch(path, { method: "POST", body: form, signal, headers: { Accept: accept } });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ProblemError({
      status: 0,
      title: "Network error",
      code: "network_error",
      detail: "The server could not be reached; check the connection and try again.",
    });
  }
  if (!response.ok) throw new ProblemError(await problemOf(response));
  return response;
}

// POST /embed-image: the encoder runs once; the answer's image_id stands for the image.
export async function embedImage(file) {
  const form = new FormData();
  form.append("file", file, file.name || "image");
  return (await post("/embed-image", form)).json();
}

// POST /segment-image with prompts (each may carry the mask_id of an earlier answer).
export async function segmentPrompts(imageId, prompts, multimask) {
  const form = new FormData();
  form.append("image_id", imageId);
  form.append("prompts", JSON.stringify(prompts));
  form.append("multimask_output", String(multimask));
  return (await post("/segment-image", form)).json();
}

// POST /segment-image without prompts, as server-sent events: onProgress({done, total})
// while it runs, then the same JSON body as the plain request.
export async function segmentEverything(imageId, params, onProgress, signal) {
  const form = new FormData();
  form.append("image_id", imageId);
  for (const [name, value] of Object.entries(params)) form.append(name, String(value));
  const response = await post("/segment-image", form, { signal, accept: "text/event-stream" });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let scanned = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end = buffer.indexOf("\n\n", scanned);
    while (end >= 0) {
      const message = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (message.event === "progress") onProgress(JSON.parse(message.data));
      else if (message.event === "result") return JSON.parse(message.data);
      else if (message.event === "error") throw new ProblemError(JSON.parse(message.data));
      end = buffer.indexOf("\n\n");
    }
    scanned = Math.max(0, buffer.length - 1);
  }
  throw new ProblemError({
    status: 0,
    title: "Interrupted",
    code: "stream_ended",
    detail: "The server closed the connection before the result; try again.",
  });
}

function parseEvent(block) {
  const message = { event: "message", data: "" };
  for (const line of block.split("\n")) {
    const colon = line.indexOf(":");
    if (colon <= 0) continue;
    const field = line.slice(0, colon);
    const value = line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") message.event = value;
    else if (field === "data") message.data += value;
  }
  return message;
}
