// Watches one job the way the original design's `useJobStatus` hook did: GET the status every
// 2 seconds and stop at a terminal state. Framework-free, so a React app can wrap it in a hook:
//
//   useEffect(() => watchJob(jobId, { fetchStatus, onUpdate: setStatus }), [jobId]);
//
// (the API offers no long-poll, so this polls).

export const TERMINAL = new Set(["completed", "failed", "cancelled"]);
export const POLL_MS = 2000;

/**
 * @param {string} jobId
 * @param {{ fetchStatus: (id: string) => Promise<object>, onUpdate: (status: object) => void,
 *           onError?: (error: Error) => void, intervalMs?: number }} options
 * @returns {() => void} stops watching
 */
export function watchJob(jobId, { fetchStatus, onUpdate, onError = () => {}, intervalMs = POLL_MS }) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    if (stopped) return;
    try {
      const status = await fetchStatus(jobId);
      if (stopped) return;
      onUpdate(status);
      if (TERMINAL.has(status.status)) return; // done: no more requests
    } catch (error) {
      if (stopped) return;
      onError(error);
    }
    timer = setTimeout(tick, intervalMs);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
