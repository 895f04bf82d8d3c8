"""serve.py against the official openai client and plain HTTP, on a live server on 127.0.0.1 (a free port, in a
thread of this process): replies are the model's own greedy continuations, streamed and not, seeded, cut at stop
strings and at max_tokens, counted in usage; long conversations are cropped from the oldest turn; bad requests get
OpenAI's error object and never take the server down; the key is enforced; a client that leaves stops its
generation; concurrent clients each get the reply they get alone. The model is a tiny random one (1 layer, 32
wide) with a real character tokenizer of 1,000 CJK characters, so that most of what it writes is text."""

import http.client
import json
import socket
import threading
import time
from types import SimpleNamespace

import openai
import pytest
import torch

import serve
from chat import ChatModel, Reply, first_stop, held_back, render
from checkpoint import save_checkpoint, tokenizer_record
from common import autocast_context
from model import GPT, GPTConfig
from tokenizer import train_char

BLOCK_SIZE = 64
CHARS = ''.join(chr(0x4E00 + i) for i in range(1000))
QUESTION = '孩子发烧三天了，咳嗽有痰。'
LIMIT = 1000  # the servers' max_tokens_limit: long enough that a client can leave mid-generation


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('served')
    tok = train_char([CHARS, QUESTION], str(folder / 'tokenizer.model'), vocab_size=1300)
    torch.manual_seed(0)
    model_args = dict(
        block_size=BLOCK_SIZE,
        vocab_size=tok.vocab_size,
        n_layer=1,
        n_head=2,
        n_embd=32,
        dropout=0.0,
        bias=False,
        n_lexical=0,
        n_entity=0,
    )
    model = GPT(GPTConfig(**model_args))
    with torch.no_grad():  # large weights: at GPT's small initial ones the tied head repeats the last token forever
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.normal_(0, 0.3)
    save_checkpoint(
        dict(
            model=model.state_dict(),
            model_args=model_args,
            config={},
            tokenizer=tokenizer_record(folder / 'tokenizer.model'),
        ),
        str(folder / 'best.pt'),
    )
    return folder


@pytest.fixture(scope='module')
def chat(run_dir):
    return ChatModel(str(run_dir), device='cpu')


def start_server(run_dir, chat, **options):
    cfg = SimpleNamespace(
        **dict(
            serve.DEFAULTS,
            out_dir=str(run_dir),
            port=0,
            device='cpu',
            max_tokens=16,
            max_tokens_limit=LIMIT,
            max_body_bytes=20_000,
            **options,
        )
    )
    server = serve.Server(cfg, chat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope='module')
def server(run_dir, chat):
    server = start_server(run_dir, chat)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope='module')
def client(server):
    client = openai.OpenAI(
        base_url=f'http://127.0.0.1:{server.server_address[1]}/v1', api_key='-', max_retries=0, timeout=30
    )
    yield client
    client.close()


def ask(client, content=QUESTION, **options):
    messages = [{'role': 'user', 'content': content}] if isinstance(content, str) else content
    return client.chat.completions.create(model='tiny', messages=messages, **options)


def greedy_ids(chat, ids, max_tokens):
    """model.generate's greedy continuation of ids, cut before the first turn-ending piece (in the precision the
    server runs in: bfloat16 on a CPU with AMX)."""
    with autocast_context(chat.device, chat.dtype):
        new = chat.model.generate(torch.tensor([ids]), max_tokens, temperature=0, eos_id=chat.turn_end_ids)
    new = new[0, len(ids) :].tolist()
    return new[: next((i for i, t in enumerate(new) if t in chat.turn_end_ids), len(new))], new


def greedy(chat, text, max_tokens):
    """(reply text, finish_reason, prompt tokens, reply tokens) for text, by greedy_ids."""
    ids = chat.tokenizer.encode(text)
    reply, new = greedy_ids(chat, ids, max_tokens)
    return render(chat.tokenizer, reply), 'stop' if len(reply) < len(new) else 'length', len(ids), len(reply)


def request(server, method, path, body=None, headers=None):
    """(status, parsed JSON body) of one plain HTTP request."""
    connection = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=30)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def raw_exchange(server, data):
    """What the server answers to bytes sent on a socket (it closes the connection after answering)."""
    with socket.create_connection(('127.0.0.1', server.server_address[1]), timeout=30) as sock:
        sock.sendall(data)
        answer = b''
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


# ----- replies ----------------------------------------------------------------------------------------


def test_reply_is_the_models_greedy_continuation_with_usage(chat, client):
    text, finish, prompt_tokens, reply_tokens = greedy(chat, f'<patient>{QUESTION}<doctor>', 40)
    answer = ask(client, temperature=0, max_tokens=40)
    choice = answer.choices[0]
    assert answer.object == 'chat.completion' and answer.id.startswith('chatcmpl-') and len(answer.choices) == 1
    assert choice.message.role == 'assistant' and choice.message.content == text and choice.finish_reason == finish
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, reply_tokens)
    assert answer.usage.total_tokens == prompt_tokens + reply_tokens and prompt_tokens == len(QUESTION) + 2


def test_max_tokens_ends_the_reply_with_length(chat, client):
    text, finish, _, reply_tokens = greedy(chat, f'<patient>{QUESTION}<doctor>', 5)
    assert finish == 'length' and reply_tokens == 5  # (the model's first 5 tokens end no turn)
    for options in (dict(max_tokens=5), dict(max_completion_tokens=5)):
        answer = ask(client, temperature=0, **options)
        assert answer.choices[0].message.content == text and answer.choices[0].finish_reason == 'length'
        assert answer.usage.completion_tokens == 5


def test_stream_sends_openai_chunks_that_add_up_to_the_reply(client):
    options = dict(temperature=1.0, top_p=1.0, extra_body={'top_k': 0}, seed=7, max_tokens=60)
    whole = ask(client, **options)
    chunks = list(ask(client, stream=True, stream_options={'include_usage': True}, **options))
    assert {c.object for c in chunks} == {'chat.completion.chunk'} and len({c.id for c in chunks}) == 1
    first, last_choice, usage_chunk = chunks[0].choices[0], chunks[-2].choices[0], chunks[-1]
    assert first.delta.role == 'assistant' and first.finish_reason is None
    assert last_choice.finish_reason == whole.choices[0].finish_reason and not last_choice.delta.content
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    pieces = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert len(pieces) > 5 and all(pieces)
    # a character of several byte pieces is sent whole: no piece ends in half of one
    assert ''.join(pieces) == whole.choices[0].message.content and not any(p.endswith('\ufffd') for p in pieces[:-1])
    plain = list(ask(client, stream=True, **options))  # without include_usage: no usage chunk
    assert plain[-1].choices[0].finish_reason == whole.choices[0].finish_reason and plain[-1].usage is None


def test_seed_makes_sampling_repeatable(client):
    options = dict(temperature=1.0, top_p=1.0, extra_body={'top_k': 0}, max_tokens=20)
    replies = [ask(client, seed=seed, **options).choices[0].message.content for seed in (1, 1, 2)]
    assert replies[0] == replies[1] != replies[2]


def test_decoding_options_reach_the_model(chat, client):
    # no_repeat_ngram_size=1: no token twice, so a greedy reply of the random model (which repeats) changes
    plain = ask(client, temperature=0, max_tokens=60).choices[0].message.content
    assert len(set(plain)) < len(plain)
    distinct = ask(client, temperature=0, max_tokens=60, extra_body={'no_repeat_ngram_size': 1})
    chars = [c for c in distinct.choices[0].message.content if c != '\ufffd']  # (byte pieces of no whole character)
    assert len(set(chars)) == len(chars)


def test_stop_string_ends_the_reply_before_it(chat, client):
    text, _, _, _ = greedy(chat, f'<patient>{QUESTION}<doctor>', 40)
    start = next(i for i in range(6, len(text) - 2) if '\ufffd' not in text[i : i + 2] and '\n' not in text[i : i + 2])
    stop = text[start : start + 2]
    for options in (dict(stop=stop), dict(stop=['不在回复里', stop])):
        answer = ask(client, temperature=0, max_tokens=40, **options)
        assert answer.choices[0].message.content == text[: text.find(stop)]
        assert answer.choices[0].finish_reason == 'stop'
        streamed = list(ask(client, temperature=0, max_tokens=40, stream=True, **options))
        assert ''.join(c.choices[0].delta.content or '' for c in streamed) == text[: text.find(stop)]
        assert streamed[-1].choices[0].finish_reason == 'stop'
    untouched = ask(client, temperature=0, max_tokens=40, stop='不在回复里')
    assert untouched.choices[0].message.content == text


# ----- the conversation -------------------------------------------------------------------------------


def test_turns_become_patient_and_doctor_and_system_messages_are_ignored(chat, client):
    messages = [
        {'role': 'user', 'content': '头痛'},
        {'role': 'assistant', 'content': '多久了？'},
        {'role': 'user', 'content': QUESTION},
    ]
    text, _, prompt_tokens, _ = greedy(chat, f'<patient>头痛<doctor>多久了？<patient>{QUESTION}<doctor>', 20)
    for extra in (
        [],
        [{'role': 'system', 'content': 'You are a helpful assistant.'}],
        [{'role': 'developer', 'content': '请简短回答。'}],
    ):
        answer = ask(client, extra + messages, temperature=0, max_tokens=20)
        assert answer.choices[0].message.content == text and answer.usage.prompt_tokens == prompt_tokens
    parts = [{'type': 'text', 'text': QUESTION[:4]}, {'type': 'text', 'text': QUESTION[4:]}]
    assert (
        ask(client, [{'role': 'user', 'content': parts}], temperature=0, max_tokens=20).choices[0].message.content
        == ask(client, temperature=0, max_tokens=20).choices[0].message.content
    )


def test_long_conversation_keeps_its_newest_turns(chat, client):
    # 11 turns of 10 tokens each (a speaker piece, 9 characters); 8 to generate leave 64 - 8 = 56 for the prompt:
    # the newest 5 turns and the final <doctor> (51 tokens)
    messages = [{'role': 'user' if i % 2 == 0 else 'assistant', 'content': CHARS[9 * i : 9 * i + 9]} for i in range(11)]
    answer = ask(client, messages, temperature=0, max_tokens=8)
    kept = ask(client, messages[-5:], temperature=0, max_tokens=8)
    assert answer.usage.prompt_tokens == kept.usage.prompt_tokens == 51
    assert answer.choices[0].message.content == kept.choices[0].message.content


def test_turn_longer_than_the_context_keeps_its_newest_tokens(chat, client):
    long_turn = CHARS[:100]
    answer = ask(client, long_turn, temperature=0, max_tokens=8)
    expected, _ = greedy_ids(chat, chat.tokenizer.encode(f'<patient>{long_turn}<doctor>')[-56:], 8)
    assert answer.usage.prompt_tokens == 56 and answer.choices[0].message.content == render(chat.tokenizer, expected)


def test_models_and_health(server, client):
    assert [card.id for card in client.models.list().data] == [str(server.model_id)]
    assert request(server, 'GET', '/health') == (200, {'status': 'ok'})


# ----- bad requests -------------------------------------------------------------------------------------


def body(**fields):
    return dict(dict(model='tiny', messages=[{'role': 'user', 'content': QUESTION}]), **fields)


BAD_REQUESTS = [  # (request body, param named, code)
    (b'{"model": "tiny", "messages": [', None, 'invalid_json'),
    (b'\xff\xfe{}', None, 'invalid_json'),
    (b'[' * 10_000 + b']' * 10_000, None, 'invalid_json'),  # nested past the parser's recursion limit
    (b'[1, 2]', None, 'invalid_type'),
    ({'messages': [{'role': 'user', 'content': 'x'}]}, 'model', 'missing_required_parameter'),
    ({'model': 'tiny'}, 'messages', 'missing_required_parameter'),
    (body(messages='hello'), 'messages', 'invalid_type'),
    (body(messages=[]), 'messages', 'empty_array'),
    (body(messages=['hello']), 'messages[0]', 'invalid_type'),
    (body(messages=[{'content': 'x'}]), 'messages[0].role', 'missing_required_parameter'),
    (body(messages=[{'role': 'tool', 'content': 'x'}]), 'messages[0].role', 'invalid_value'),
    (body(messages=[{'role': ['user'], 'content': 'x'}]), 'messages[0].role', 'invalid_type'),
    (body(messages=[{'role': 'user'}]), 'messages[0].content', 'missing_required_parameter'),
    (body(messages=[{'role': 'user', 'content': 5}]), 'messages[0].content', 'invalid_type'),
    (
        body(messages=[{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': 'x'}}]}]),
        'messages[0].content[0].type',
        'invalid_value',
    ),
    (
        body(messages=[{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}]),
        'messages',
        'invalid_value',
    ),
    (body(messages=[{'role': 'system', 'content': 'x'}]), 'messages', 'invalid_value'),
    (body(max_tokens=LIMIT + 1), 'max_tokens', 'invalid_value'),
    (body(max_tokens=0), 'max_tokens', 'invalid_value'),
    (body(max_tokens='5'), 'max_tokens', 'invalid_type'),
    (body(max_tokens=True), 'max_tokens', 'invalid_type'),
    (body(max_tokens=2.5), 'max_tokens', 'invalid_type'),
    (body(max_completion_tokens=10**30), 'max_completion_tokens', 'invalid_value'),
    (body(temperature=-1), 'temperature', 'invalid_value'),
    (body(temperature='hot'), 'temperature', 'invalid_type'),
    (
        b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
        'temperature',
        'invalid_value',
    ),
    (body(temperature=10**400), 'temperature', 'invalid_value'),
    (body(top_p=0), 'top_p', 'invalid_value'),
    (body(top_k=-1), 'top_k', 'invalid_value'),
    (body(top_k=1.5), 'top_k', 'invalid_type'),
    (body(repetition_penalty=0), 'repetition_penalty', 'invalid_value'),
    (body(no_repeat_ngram_size=-1), 'no_repeat_ngram_size', 'invalid_value'),
    (body(seed=1.5), 'seed', 'invalid_type'),
    (body(stop=5), 'stop', 'invalid_type'),
    (body(stop=['a', 'b', 'c', 'd', 'e']), 'stop', 'invalid_value'),
    (body(stop=['']), 'stop', 'invalid_value'),
    (body(stop=[1]), 'stop[0]', 'invalid_type'),
    (body(stream='yes'), 'stream', 'invalid_type'),
    (body(stream=True, stream_options={'include_usage': 'yes'}), 'stream_options.include_usage', 'invalid_type'),
    (body(n=2), 'n', 'invalid_value'),
]


@pytest.mark.parametrize('bad, param, code', BAD_REQUESTS)
def test_bad_request_gets_openais_error_naming_the_field(server, bad, param, code):
    status, answer = request(server, 'POST', '/v1/chat/completions', bad, {'Content-Type': 'application/json'})
    assert status == 400, answer
    error = answer['error']
    assert (error['param'], error['code'], error['type']) == (param, code, 'invalid_request_error'), error
    assert isinstance(error['message'], str) and error['message'] and 'Traceback' not in error['message']


def test_bad_http_gets_json_errors_and_the_server_stays_up(server, client):
    port = server.server_address[1]
    # a body past the limit is refused unread, and the client, still sending it, gets the answer all the same
    assert request(server, 'POST', '/v1/chat/completions', b'{"a": "' + b'x' * 3_000_000 + b'"}')[0] == 413
    assert request(server, 'POST', '/v1/completions', body())[0] == 404
    assert request(server, 'GET', '/v1/chat/completions')[0] == 405
    status, answer = request(server, 'PUT', '/v1/chat/completions', body())
    assert status == 501 and answer['error']['type'] == 'invalid_request_error'
    for head in (
        b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n',  # no Content-Length
        b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n',
        b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n',
        b'GET /a b c HTTP/1.1\r\n\r\n',
    ):  # a malformed request line
        status_line, _, rest = raw_exchange(server, head).partition(b'\r\n')
        assert int(status_line.split()[1]) in (400, 411), status_line
        assert 'error' in json.loads(rest.partition(b'\r\n\r\n')[2])
    # a body shorter than its Content-Length, the client gone: nothing answers, nothing breaks
    with socket.create_connection(('127.0.0.1', port)) as sock:
        sock.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model"')
    assert ask(client, temperature=0, max_tokens=3).choices[0].finish_reason in ('stop', 'length')


# ----- the key and the address --------------------------------------------------------------------------


def test_api_key_is_required_when_set(run_dir, chat):
    server = start_server(run_dir, chat, api_key='s3cret')
    base_url = f'http://127.0.0.1:{server.server_address[1]}/v1'
    try:
        for headers in ({}, {'Authorization': 'Bearer wrong'}, {'Authorization': 's3cret'}):
            status, answer = request(server, 'POST', '/v1/chat/completions', body(), headers)
            assert status == 401 and answer['error']['code'] == 'invalid_api_key'
        assert request(server, 'GET', '/v1/models')[0] == 401
        assert request(server, 'GET', '/health')[0] == 200  # a probe needs no key
        with openai.OpenAI(base_url=base_url, api_key='wrong', max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError):
                ask(wrong, max_tokens=2)
        with openai.OpenAI(base_url=base_url, api_key='s3cret', max_retries=0) as right:
            assert ask(right, max_tokens=2).choices[0].finish_reason in ('stop', 'length')
    finally:
        server.shutdown()
        server.server_close()


def test_other_addresses_need_a_key_and_the_key_is_not_printed(tmp_path, capsys):
    for host in ('127.0.0.1', 'localhost', '::1'):
        assert serve.is_loopback(host)
    for host in ('0.0.0.0', '', '::'):
        assert not serve.is_loopback(host)
    with pytest.raises(SystemExit, match='--api_key'):  # refused before anything loads
        serve.main(['--host=0.0.0.0', f'--checkpoint={tmp_path}/none.pt'])
    with pytest.raises(SystemExit, match='--max_tokens must be'):
        serve.main(['--host=0.0.0.0', '--api_key=s3cret', '--max_tokens=0', f'--checkpoint={tmp_path}/none.pt'])
    assert 's3cret' not in capsys.readouterr().out


# ----- many clients -------------------------------------------------------------------------------------


def test_client_leaving_stops_its_generation(server, client, capsys):
    port = server.server_address[1]
    for stream in (True, False):
        payload = json.dumps(body(stream=stream, max_tokens=LIMIT, temperature=1.0)).encode()
        with socket.create_connection(('127.0.0.1', port), timeout=30) as sock:
            sock.sendall(
                b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                b'Content-Length: %d\r\n\r\n' % len(payload) + payload
            )
            if stream:  # read up to the first piece of content, then leave
                received = b''
                while received.count(b'data: ') < 2:  # the chunk with the role, then one with content
                    received += sock.recv(4096)
        answer = ask(client, temperature=0, max_tokens=3)  # the next request is served
        assert answer.choices[0].finish_reason in ('stop', 'length')
        deadline = time.time() + 10
        while 'the client left after' not in (log := capsys.readouterr().err) and time.time() < deadline:
            time.sleep(0.05)
        left = log.split('the client left after ')[1].split()
        assert int(left[0]) < LIMIT and left[1:4] == ['of', 'at', 'most'], log


def test_concurrent_clients_each_get_their_own_reply(client):
    questions = [QUESTION, '头痛两周了。', CHARS[:12], CHARS[500:520]]
    alone = [ask(client, q, temperature=0, max_tokens=30).choices[0].message.content for q in questions]
    start, results = threading.Barrier(len(questions)), {}

    def consult(i):
        start.wait()
        if i % 2:
            chunks = ask(client, questions[i], temperature=0, max_tokens=30, stream=True)
            results[i] = ''.join(c.choices[0].delta.content or '' for c in chunks)
        else:
            results[i] = ask(client, questions[i], temperature=0, max_tokens=30).choices[0].message.content

    threads = [threading.Thread(target=consult, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [results.get(i) for i in range(len(questions))] == alone
    assert len(set(alone)) == len(alone)


def test_a_burst_of_connections_is_served(server):
    start, statuses = threading.Barrier(32), []  # 32 clients connect at the same moment: none is turned away

    def consult():
        start.wait()
        statuses.append(request(server, 'POST', '/v1/chat/completions', body(max_tokens=2))[0])

    threads = [threading.Thread(target=consult) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 32


def test_served_connections_leave_no_threads_behind(server):
    before = threading.active_count()
    with openai.OpenAI(
        base_url=f'http://127.0.0.1:{server.server_address[1]}/v1', api_key='-', max_retries=0
    ) as short_lived:
        for _ in range(10):
            ask(short_lived, max_tokens=2)
    deadline = time.time() + 10
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


def test_turn_ending_piece_ends_the_reply_unsent(chat):
    tok, sent = chat.tokenizer, []
    reply = Reply(tok, chat.turn_end_ids, [], sent.append, lambda: False)
    for token in tok.encode('发烧') + [tok.patient_id]:
        reply(torch.tensor([[token]]))
    assert (reply.text, reply.finish, reply.ids, sent) == ('发烧', 'stop', tok.encode('发烧'), ['发', '烧'])


def test_held_back_text_waits_for_whole_characters_and_stop_strings():
    assert held_back('发烧\ufffd', []) == 1
    assert held_back('发烧三', ['三天', '烧三天']) == 2
    assert held_back('发烧三', ['天']) == 0
    assert first_stop('发烧三天了', ['天了', '烧']) == 1
