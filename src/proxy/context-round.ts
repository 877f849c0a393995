/**
 * "Establish the tenant context" as a procedure on a server connection
 * (the statements themselves are in tenant/context.ts):
 *
 *   binding (once per server connection) ──Z──▶ context ──Z──▶ done
 *     1 2 D C: pid, backend binding, could-bypass-RLS     1 2 D C 1 2 D C: set_config ×3, context_status
 *
 * It swallows every reply except ParameterStatus and notices (the client
 * sees those, as it would after its own SET), and it fails loudly: the
 * database must say the context verifies ('ok'), or the session ends with
 * an error naming the likely cause, never 0 rows and a "context set" log.
 */
import type { Frame } from "../protocol/framer.ts";
import { MSG, readDataRow, readErrorFields, readParameterStatus, type ErrorFields } from "../protocol/messages.ts";
import { bindingQuery, contextKeyId, contextQuery, readBinding, readStatus, type ContextRules } from "../tenant/context.ts";
import { errors } from "./errors.ts";
import type { ServerConnection } from "./server-connection.ts";

export interface ContextRequest {
  rules: ContextRules;
  identity: { role: string; tenant: string };
  key: Uint8Array;
  /** For messages: the database this server connection is logged in to. */
  database: string;
}

export type ContextResult = { ok: true; ready: Uint8Array } | { ok: false; error: ErrorFields };

export function establishContext(
  server: ServerConnection,
  request: ContextRequest,
  /** ParameterStatus and NoticeResponse, for the client. */
  relay: (raw: Uint8Array) => void,
  done: (result: ContextResult) => void,
): void {
  const role = request.rules.role ?? request.identity.role;
  let round: "binding" | "context" = server.binding ? "context" : "binding";
  let completed = 0; // CommandCompletes in this round
  let answered = false; // this round's ParseComplete came: what follows answers it
  let status: string | undefined;
  server.tenant = undefined; // whatever it carried is being replaced

  const finish = (result: ContextResult) => {
    done(result);
    return "done" as const;
  };

  server.read((m: Frame) => {
    // A reply before our ParseComplete answers nothing we sent: something
    // between us and PostgreSQL (a pooler syncing its own settings) talks
    // on this connection too.
    if (!answered && (m.type === MSG.commandComplete || m.type === MSG.dataRow || m.type === MSG.readyForQuery)) {
      return finish({ ok: false, error: errors.strangerOnTheLine(String.fromCharCode(m.type)) });
    }
    switch (m.type) {
      case MSG.parseComplete:
        answered = true;
        return "more";
      case MSG.bindComplete:
        return "more";
      case MSG.commandComplete:
        completed++;
        return "more";
      case MSG.dataRow: {
        const values = readDataRow(m.body);
        if (round === "binding") {
          const b = readBinding(values);
          // Behind a pooler, BackendKeyData names the pooler's connection,
          // not the backend that would check the signature.
          if (server.key && b.pid !== server.key.processId) return finish({ ok: false, error: errors.poolerInBetween(server.key.processId, b.pid) });
          if (b.canBypassRls) return finish({ ok: false, error: errors.roleBypassesRls(role) });
          server.binding = b.binding;
        } else if (completed === 1) {
          status = readStatus(values);
        }
        return "more";
      }
      case MSG.parameterStatus:
        server.parameters.set(readParameterStatus(m.body)[0], m.raw.slice());
        relay(m.raw);
        return "more";
      case MSG.noticeResponse:
        relay(m.raw);
        return "more";
      case MSG.errorResponse: {
        const f = readErrorFields(m.body);
        const code = f.get("C") ?? "";
        const message = f.get("M") ?? "unknown error";
        if (round === "binding" && (code === "42883" || code === "3F000")) return finish({ ok: false, error: errors.setupMissing(request.database, message) });
        return finish({ ok: false, error: errors.contextFailed(code, message) });
      }
      case MSG.readyForQuery:
        if (round === "binding") {
          if (!server.binding) return finish({ ok: false, error: errors.contextFailed("08P01", "the backend binding query returned no row") });
          round = "context";
          completed = 0;
          answered = false;
          server.send(contextQuery(request.rules, request.identity, request.key, server.binding));
          return "more";
        }
        if (status !== "ok") return finish({ ok: false, error: errors.contextUnverified(status ?? "no reply", request.database, contextKeyId(request.key)) });
        server.tenant = request.identity.tenant;
        return finish({ ok: true, ready: m.raw.slice() });
      default:
        return finish({ ok: false, error: errors.contextFailed("08P01", `unexpected message '${String.fromCharCode(m.type)}' from the server`) });
    }
  });
  server.send(round === "binding" ? bindingQuery(role) : contextQuery(request.rules, request.identity, request.key, server.binding!));
}
