<?php
/**
 * A mailroom capture worker in the goridge codec: RoadRunner's frame format
 * over stdin/stdout, so the same loop works with spiral/roadrunner-worker
 * (`$worker->waitPayload()`, event JSON in `$payload->header`). This file
 * needs nothing but php-cli: it reads and writes the frames itself.
 *
 * Frame: 12-byte header (version<<4 | header words, flags, u32 LE payload
 * length, u32 LE CRC-32 of bytes 0-5, 2 reserved), options (u32 LE each),
 * payload. A task has options[0] = context length; the payload is the
 * context (the event JSON) followed by the body (empty). Control frames
 * (flag 0x01) carry {"pid":...} (answer with our pid) or {"stop":true}.
 *
 * Usage (in [capture.workers]):
 *     command = ["php", "examples/workers/goridge_worker.php", "/tmp/events.jsonl"]
 *     codec = "goridge"
 *
 * With a path argument, each event is also appended to that file as one
 * JSON line. A subject containing "[close]" gets CLOSE.
 */

declare(strict_types=1);

const CONTROL = 0x01;
const ERROR = 0x40;

function read_exact($in, int $n): ?string
{
    $buf = '';
    while (strlen($buf) < $n) {
        $chunk = fread($in, $n - strlen($buf));
        if ($chunk === false || $chunk === '') {
            if (feof($in)) {
                return null;
            }
            continue;
        }
        $buf .= $chunk;
    }
    return $buf;
}

/** @return array{flags:int, options:int[], payload:string}|null */
function read_frame($in): ?array
{
    $head = read_exact($in, 12);
    if ($head === null) {
        return null;
    }
    $words = ord($head[0]) & 0x0f;
    $crc = unpack('V', substr($head, 6, 4))[1];
    if (crc32(substr($head, 0, 6)) !== $crc) {
        throw new RuntimeException('goridge: bad header CRC');
    }
    $length = unpack('V', substr($head, 2, 4))[1];
    $options = [];
    if ($words > 3) {
        $options = array_values(unpack('V*', read_exact($in, ($words - 3) * 4) ?? ''));
    }
    $payload = $length > 0 ? read_exact($in, $length) : '';
    if ($payload === null) {
        return null;
    }
    return ['flags' => ord($head[1]), 'options' => $options, 'payload' => $payload];
}

function write_frame($out, int $flags, array $options, string $payload): void
{
    $head = chr((1 << 4) | (3 + count($options))) . chr($flags) . pack('V', strlen($payload));
    $head .= pack('V', crc32($head)) . "\0\0";
    foreach ($options as $option) {
        $head .= pack('V', $option);
    }
    fwrite($out, $head . $payload);
    fflush($out);
}

$in = fopen('php://stdin', 'rb');
$out = fopen('php://stdout', 'wb');
$err = fopen('php://stderr', 'wb');
$logPath = $argv[1] ?? null;

while (($frame = read_frame($in)) !== null) {
    if ($frame['flags'] & CONTROL) {
        $command = json_decode($frame['payload'], true);
        if (!empty($command['stop'])) {
            exit(0);
        }
        if (!empty($command['pid'])) {
            write_frame($out, CONTROL, [], json_encode(['pid' => getmypid()]));
        }
        continue;
    }
    $contextLength = $frame['options'][0] ?? 0;
    $context = substr($frame['payload'], 0, $contextLength);
    try {
        $event = json_decode($context, true, 512, JSON_THROW_ON_ERROR);
    } catch (JsonException $e) {
        write_frame($out, ERROR, [], 'bad event: ' . $e->getMessage());
        continue;
    }
    $subject = $event['message']['subject'] ?? '';
    fwrite($err, sprintf(
        "php worker: %s from %s subject %s, %d attachment(s)\n",
        $event['uuid'],
        $event['envelope']['from'],
        json_encode($subject, JSON_UNESCAPED_UNICODE),
        count($event['attachments'])
    ));
    if ($logPath !== null) {
        file_put_contents($logPath, $context . "\n", FILE_APPEND | LOCK_EX);
    }
    $reply = str_contains((string) $subject, '[close]') ? 'CLOSE' : 'CONTINUE';
    // RoadRunner's response layout: options[0] = header length, then body.
    write_frame($out, 0, [0], $reply);
}
