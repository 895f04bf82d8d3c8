"""
An OpenAI-compatible chat API over any model sample.py loads, written with the standard library (http.server):
the official openai client, chat front-ends and evaluation harnesses can consult the model.

    python serve.py --out_dir=out/tiny                                      # http://127.0.0.1:8000/v1
    python serve.py --checkpoint=out/pt/prompt.pt --base=out/tiny/best.pt --port=8001
    python serve.py --host=0.0.0.0 --api_key=SECRET                         # reachable from other machines

    POST /v1/chat/completions   OpenAI's chat schema; "stream": true sends server-sent events
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok"}, without the key

The user's messages are the patient's turns and the assistant's the doctor's; the reply is the doctor's next turn.
System (and developer) messages are accepted and ignored: the model was trained on consultations alone and has no
place for instructions. A conversation longer than the context loses its oldest turns first (chat.py). Each
connection is served by a thread of its own, but the model generates for one request at a time, in turn (there is
no batch generation): replies never mix their tokens, and a request waits while others are generated. A client
that leaves stops its generation. A bad request gets OpenAI's error object with a 4xx status, never a traceback.
docs/serving.md has the whole mapping, the limits and client examples.
"""

import hmac
import ipaddress
import json
import select
import socket
import time
import traceback
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Lock
from types import SimpleNamespace
from urllib.parse import urlsplit

from chat import Aborted, ChatModel
from common import DECODING_RULES
from configurator import configure

DEFAULTS = dict(
    out_dir='out/tiny',  # a run directory (prompt.pt, best.pt or ckpt.pt in it) ...
    checkpoint='',  # ... or this checkpoint / p-tuning file
    base='',  # a p-tuning file's base checkpoint ('' = the path the file recorded)
    data_dir='',  # checkpoints without a tokenizer record only: where tokenizer.model is
    device='auto',
    host='127.0.0.1',  # any address but a loopback one needs --api_key
    port=8000,  # 0 = a free port (printed at start)
    api_key='',  # when set, /v1/ answers only requests with the header Authorization: Bearer <api_key>
    max_tokens=200,  # a reply's length when a request gives no max_tokens
    max_tokens_limit=1024,  # the most max_tokens a request may ask for
    max_body_bytes=1_000_000,  # a larger request is refused (413) unread
)
# decoding when a request does not say: sample.py's defaults, and no penalties against repeats
DECODING_DEFAULTS = dict(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.0, no_repeat_ngram_size=0)
ROLES = {'system': None, 'developer': None, 'user': 'patient', 'assistant': 'doctor'}  # None: ignored
MAX_STOPS, MAX_STOP_CHARS = 4, 100  # stop strings per request (OpenAI's limit), characters in each
CLIENT_TIMEOUT_S = 60  # a client that sends or reads nothing for this long is dropped
# the JSON types json.loads gives, named as OpenAI's errors name them
TYPE_NAMES = {bool: 'a boolean', int: 'an integer', float: 'a number', str: 'a string', list: 'an array'}
TYPE_NAMES.update({dict: 'an object', type(None): 'null'})
NUMBER = (int, float)


# ----------------------------------------------------------------------------- reading a request


class RequestError(Exception):
    """A request refused: the HTTP status, and OpenAI's error object (message, param, code)."""

    def __init__(self, status, code, message, param=None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def error_body(message, param=None, code=None, kind='invalid_request_error'):
    return {'error': {'message': message, 'type': kind, 'param': param, 'code': code}}


def invalid(param, message):
    return RequestError(400, 'invalid_value', f"Invalid '{param}': {message}", param)


def typed(value, kinds, param, required=False):
    """value when it has one of kinds (a boolean is no number here); None when absent or null, unless required."""
    if value is None and required:
        raise RequestError(400, 'missing_required_parameter', f"Missing required parameter: '{param}'.", param)
    if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
        expected = 'a number' if kinds == NUMBER else ' or '.join(TYPE_NAMES[kind] for kind in kinds)
        message = f"Invalid type for '{param}': expected {expected}, but got {TYPE_NAMES[type(value)]} instead."
        raise RequestError(400, 'invalid_type', message, param)
    return value


def parse_request(body, cfg):
    """The request's JSON body, checked: SimpleNamespace(turns, max_tokens, decoding, seed, stop, stream,
    include_usage), or a RequestError naming the field. Fields not read here are accepted and ignored."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as error:  # (a UnicodeDecodeError is a ValueError)
        message = f'We could not parse the JSON body of your request ({type(error).__name__}: {str(error)[:200]}).'
        raise RequestError(400, 'invalid_json', message) from None
    if not isinstance(request, dict):
        raise RequestError(400, 'invalid_type', f'The body must be a JSON object, not {TYPE_NAMES[type(request)]}.')
    typed(request.get('model'), (str,), 'model', required=True)  # any name: one model is served
    checked = SimpleNamespace(turns=read_turns(typed(request.get('messages'), (list,), 'messages', required=True)))
    if typed(request.get('n'), (int,), 'n') not in (None, 1):
        raise invalid('n', f"{request['n']}: this server generates one choice per request (n = 1).")
    param = 'max_completion_tokens' if request.get('max_completion_tokens') is not None else 'max_tokens'
    max_tokens = typed(request.get(param), (int,), param)  # (the newer name first)
    checked.max_tokens = cfg.max_tokens if max_tokens is None else max_tokens
    if not 1 <= checked.max_tokens <= cfg.max_tokens_limit:
        raise invalid(param, f'{checked.max_tokens}: this server generates 1 to {cfg.max_tokens_limit} tokens.')
    checked.decoding = {}
    for name, (allowed, said) in DECODING_RULES.items():
        value = typed(request.get(name), (int,) if isinstance(DECODING_DEFAULTS[name], int) else NUMBER, name)
        value = DECODING_DEFAULTS[name] if value is None else value
        if not (abs(value) < 1e300 and allowed(value)):  # (an integer too large for a float is refused first)
            raise invalid(name, f'{str(value)[:40]}: it must be {said}.')
        checked.decoding[name] = value
    checked.seed = typed(request.get('seed'), (int,), 'seed')
    checked.stop = read_stop(request.get('stop'))
    checked.stream = bool(typed(request.get('stream'), (bool,), 'stream'))
    options = typed(request.get('stream_options'), (dict,), 'stream_options') or {}
    checked.include_usage = bool(typed(options.get('include_usage'), (bool,), 'stream_options.include_usage'))
    return checked


def read_turns(messages):
    """[(speaker, text)] of the messages, system messages left out; the last turn must be the patient's."""
    if not messages:
        message = "Invalid 'messages': empty array. Expected an array with minimum length 1."
        raise RequestError(400, 'empty_array', message, 'messages')
    turns = []
    for i, message in enumerate(messages):
        typed(message, (dict,), f'messages[{i}]')
        role = typed(message.get('role'), (str,), f'messages[{i}].role', required=True)
        if role not in ROLES:
            raise invalid(
                f'messages[{i}].role', f"{role[:40]!r}. Supported: 'system', 'developer', 'user', 'assistant'."
            )
        text = message_text(message.get('content'), f'messages[{i}].content')
        if ROLES[role]:
            turns.append((ROLES[role], text))
    if not turns or turns[-1][0] != 'patient':
        raise invalid('messages', "the last message must be a user's: the reply answers the patient's last turn.")
    return turns


def message_text(content, param):
    """A message's text: a string, or an array of text parts (their texts joined)."""
    content = typed(content, (str, list), param, required=True)
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        typed(part, (dict,), f'{param}[{i}]')
        if part.get('type') != 'text':
            raise invalid(f'{param}[{i}].type', f"{str(part.get('type'))[:40]!r}: this model reads text parts only.")
        texts.append(typed(part.get('text'), (str,), f'{param}[{i}].text', required=True))
    return ''.join(texts)


def read_stop(stop):
    """The stop strings: one string or an array of up to MAX_STOPS, each 1 to MAX_STOP_CHARS characters."""
    stops = [stop] if isinstance(stop, str) else typed(stop, (list,), 'stop') or []
    if len(stops) > MAX_STOPS:
        raise invalid('stop', f'{len(stops)} strings: at most {MAX_STOPS}.')
    for i, text in enumerate(stops):
        typed(text, (str,), 'stop' if isinstance(stop, str) else f'stop[{i}]', required=True)
        if not 1 <= len(text) <= MAX_STOP_CHARS:
            raise invalid('stop', f'a stop string of {len(text)} characters: each has 1 to {MAX_STOP_CHARS}.')
    return stops


def usage(prompt_tokens, completion_tokens):
    total_tokens = prompt_tokens + completion_tokens
    return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total_tokens)


# ----------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    """One connection: its requests, one after another (HTTP/1.1 keeps the connection open between them)."""

    protocol_version = 'HTTP/1.1'
    timeout = CLIENT_TIMEOUT_S
    server_version = 'cmed-gpt-serve'

    def do_GET(self):
        self.respond(self.get)

    def do_POST(self):
        self.respond(self.post)

    def respond(self, handle):
        """handle(path), with every failure answered: a refused request in OpenAI's error shape, a client that
        left with nothing, anything unexpected logged here and answered with a server_error (500)."""
        self.streaming = self.body_read = False
        try:
            handle(urlsplit(self.path).path)
        except RequestError as error:
            self.close_connection = True  # its body may be unread
            self.send_json(error.status, error_body(str(error), error.param, error.code))
            announced = self.headers.get('Content-Length', '0').strip() != '0' or self.headers.get('Transfer-Encoding')
            if announced and not self.body_read:
                self.linger()
        except OSError:  # the client left or stalled (a broken pipe, a reset, a timeout)
            self.close_connection = True
        except Exception:
            traceback.print_exc()
            self.close_connection = True
            body = error_body('The server failed while answering this request; its log says why.', kind='server_error')
            try:
                if self.streaming:
                    self.send_event(body)
                else:
                    self.send_json(500, body)
            except OSError:
                pass

    def get(self, path):
        if path == '/health':
            return self.send_json(200, {'status': 'ok'})
        self.check_key()
        if path == '/v1/models':
            card = dict(id=self.server.model_id, object='model', created=self.server.created, owned_by='cmed-gpt')
            return self.send_json(200, {'object': 'list', 'data': [card]})
        if path == '/v1/chat/completions':
            raise RequestError(405, 'method_not_allowed', 'Use POST for /v1/chat/completions.')
        raise RequestError(404, 'unknown_url', f'Invalid URL (GET {path[:200]})')

    def post(self, path):
        self.check_key()
        if path != '/v1/chat/completions':
            raise RequestError(404, 'unknown_url', f'Invalid URL (POST {path[:200]})')
        request = parse_request(self.read_body(), self.server.cfg)
        (self.stream if request.stream else self.complete)(request)

    def check_key(self):
        key = self.server.cfg.api_key
        sent = self.headers.get('Authorization', '').encode('latin-1')  # (http.client decodes headers so)
        if key and not hmac.compare_digest(sent, f'Bearer {key}'.encode()):
            message = 'Incorrect or missing API key: send the header Authorization: Bearer <key>.'
            raise RequestError(401, 'invalid_api_key', message)

    def read_body(self):
        length, limit = self.headers.get('Content-Length', '').strip(), self.server.cfg.max_body_bytes
        if self.headers.get('Transfer-Encoding') or not length:
            raise RequestError(411, 'length_required', 'Send the body with a Content-Length (chunked is not read).')
        if not (length.isascii() and length.isdigit()):
            raise RequestError(400, 'invalid_content_length', f'Content-Length {length[:40]!r} is not a number.')
        if int(length) > limit:
            raise RequestError(413, 'request_too_large', f'The body has {length} bytes; this server reads {limit}.')
        body = self.rfile.read(int(length))
        self.body_read = True
        if len(body) < int(length):
            raise ConnectionResetError('the client closed the connection before sending the whole body')
        return body

    def head(self, kind):
        """What every answer and every chunk of one starts with."""
        return dict(
            id=f'chatcmpl-{uuid.uuid4().hex}', object=kind, created=int(time.time()), model=self.server.model_id
        )

    def complete(self, request):
        answer = self.generate(request)
        if answer is not None:
            text, finish, prompt_tokens, completion_tokens = answer
            choice = dict(index=0, message=dict(role='assistant', content=text), logprobs=None, finish_reason=finish)
            completion = dict(self.head('chat.completion'), choices=[choice])
            self.send_json(200, dict(completion, usage=usage(prompt_tokens, completion_tokens)))

    def stream(self, request):
        """Server-sent events shaped as OpenAI's: a chunk with the role, chunks of content, a chunk with the
        finish_reason, (stream_options.include_usage) a chunk with the usage, then [DONE]."""
        head = self.head('chat.completion.chunk')

        def chunk(delta, finish=None):
            choice = dict(index=0, delta=delta, logprobs=None, finish_reason=finish)
            self.send_event(dict(head, choices=[choice], **({'usage': None} if request.include_usage else {})))

        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream; charset=utf-8')
        self.send_header('Cache-Control', 'no-cache')
        self.send_header('Connection', 'close')  # the stream ends where the connection does
        self.end_headers()
        self.streaming = True
        chunk(dict(role='assistant', content=''))
        answer = self.generate(request, send=lambda text: chunk(dict(content=text)))
        if answer is not None:
            _, finish, prompt_tokens, completion_tokens = answer
            chunk({}, finish)
            if request.include_usage:
                self.send_event(dict(head, choices=[], usage=usage(prompt_tokens, completion_tokens)))
            self.wfile.write(b'data: [DONE]\n\n')

    def generate(self, request, send=None):
        """ChatModel.reply's answer once the model is free, or None when the client left (then logged)."""
        with self.server.model_lock:
            try:
                if self.client_gone():
                    raise Aborted(0)
                return self.server.chat.reply(
                    request.turns,
                    request.max_tokens,
                    request.decoding,
                    request.seed,
                    request.stop,
                    send,
                    abort=self.client_gone,
                )
            except Aborted as gone:
                self.log_message(
                    'the client left after %d of at most %d tokens: generation stopped',
                    gone.args[0],
                    request.max_tokens,
                )
                self.close_connection = True
                return None

    def client_gone(self):
        """True once the client has closed its end of the connection: readable, with nothing left to read."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b''
        except (OSError, ValueError):  # (a reset connection; a closed socket has no file descriptor)
            return True

    def linger(self):
        """Read what the client still sends of a body left unread (for at most 2 s, 10 MB) before the connection
        closes: closing with unread bytes resets the connection, and the client could lose the answer."""
        self.connection.shutdown(socket.SHUT_WR)  # the answer is whole: the client reads it, then closes
        deadline, received = time.monotonic() + 2, 0
        while time.monotonic() < deadline and received < 10_000_000:
            self.connection.settimeout(max(deadline - time.monotonic(), 0.01))
            data = self.connection.recv(65536)
            if not data:
                break
            received += len(data)

    def send_json(self, status, body):
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        if self.close_connection:
            self.send_header('Connection', 'close')
        self.end_headers()
        self.wfile.write(data)

    def send_event(self, body):
        self.wfile.write(b'data: ' + json.dumps(body, ensure_ascii=False).encode() + b'\n\n')

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, an unknown method, ...) in OpenAI's error shape."""
        self.close_connection = True
        try:
            self.send_json(code, error_body(message or HTTPStatus(code).phrase))
        except OSError:
            pass


class Server(ThreadingHTTPServer):
    """The HTTP server: each connection in a daemon thread of its own (none is kept once it ends, so memory does
    not grow with the requests served), and the model behind one lock."""

    request_queue_size = socket.SOMAXCONN  # connections not yet accepted (socketserver's 5 resets a burst of clients)

    def __init__(self, cfg, chat):
        self.address_family = socket.AF_INET6 if ':' in cfg.host else socket.AF_INET
        super().__init__((cfg.host, cfg.port), Handler)
        self.cfg, self.chat, self.model_lock = cfg, chat, Lock()
        self.model_id, self.created = cfg.checkpoint or cfg.out_dir, int(time.time())


# ----------------------------------------------------------------------------- command line


def is_loopback(host):
    """Whether every address host names is a loopback one ('' and 0.0.0.0: every interface, so not)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)} if host else {'0.0.0.0'}
    except socket.gaierror as error:
        raise SystemExit(f'--host={host} is not an address of this machine ({error.strerror})') from None
    return all(ipaddress.ip_address(address.split('%')[0]).is_loopback for address in addresses)


def check_options(cfg):
    """The limits in range, and a key for any address but loopback, before anything loads."""
    rules = [('max_tokens_limit', cfg.max_tokens_limit >= 1, '>= 1'), ('port', 0 <= cfg.port <= 65535, 'in 0..65535')]
    rules += [('max_tokens', 1 <= cfg.max_tokens <= cfg.max_tokens_limit, 'in 1..--max_tokens_limit')]
    rules += [('max_body_bytes', cfg.max_body_bytes >= 1, '>= 1')]
    for key, ok, allowed in rules:
        if not ok:
            raise SystemExit(f'--{key} must be {allowed}, not {getattr(cfg, key)}')
    if not cfg.api_key and not is_loopback(cfg.host):
        raise SystemExit(
            f'--host={cfg.host} is reachable from other machines: give --api_key=<a secret> too '
            f'(clients then send Authorization: Bearer <the secret>), or serve on --host=127.0.0.1'
        )


def main(argv=None):
    cfg = SimpleNamespace(**configure(DEFAULTS, argv))
    check_options(cfg)
    chat = ChatModel(cfg.checkpoint or cfg.out_dir, cfg.base, cfg.data_dir, cfg.device)
    try:
        server = Server(cfg, chat)
    except OSError as error:
        raise SystemExit(f'cannot listen on {cfg.host}:{cfg.port}: {error.strerror or error}') from None
    host, port = server.server_address[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    print(f'serving {server.model_id} at {url} (one generation at a time; Ctrl-C stops)', flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == '__main__':
    main()
