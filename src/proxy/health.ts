/**
 * What /readyz and the counters know about the upstream beyond "does it
 * accept TCP": whether the proxy's own credential still logs in, and
 * whether the database knows the context key. An injected `ALTER ROLE …
 * PASSWORD` cannot grant anyone access under `--auth proxy`, but it does
 * break new server logins; that must show as not ready, with the reason,
 * rather than as a trickle of client errors.
 */
export class UpstreamHealth {
  /** Clients that failed to authenticate (wrong password, unknown user, bad token). */
  authFailures = 0;
  /** What is wrong → why, e.g. "login as app_user@app" → "password authentication failed …". */
  private readonly open = new Map<string, string>();

  /** Record the outcome of `what`: a problem, or undefined once it works. */
  report(what: string, problem: string | undefined): void {
    if (problem === undefined) this.open.delete(what);
    else this.open.set(what, problem);
  }

  /** Why the proxy is not ready, one line each; empty when it is. */
  problems(): string[] {
    return [...this.open].map(([what, why]) => `${what}: ${why}`);
  }
}
