// LoRA Trainer: browser side of the "Train LoRA" tab (A1111 1.10 and Forge load every file in javascript/).
// - "Send to txt2img": the tab keeps the text in a hidden textbox (#lora_trainer_send_text); the
//   button #lora_trainer_send_to_txt2img appends it to the txt2img prompt and switches tab.
// - After a LoRA is saved (the hidden text changes), the Lora cards are refreshed so the new card
//   appears without a click.
(function() {
    "use strict";

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function sendText() {
        var box = app().querySelector("#lora_trainer_send_text textarea, #lora_trainer_send_text input");
        return box ? box.value.trim() : "";
    }

    function fireInput(el) {
        if (typeof updateInput === "function") {
            updateInput(el);  // the WebUI's helper: an input event gradio listens to
        } else {
            el.dispatchEvent(new Event("input", {bubbles: true}));
        }
    }

    function switchToTxt2img() {
        if (typeof switch_to_txt2img === "function") {
            switch_to_txt2img();
            return;
        }
        var tabs = app().querySelector("#tabs");
        var first = tabs && tabs.querySelector("button");
        if (first) first.click();
    }

    function sendToTxt2img() {
        var text = sendText();
        var prompt = app().querySelector("#txt2img_prompt textarea");
        if (!text || !prompt) return;
        if (prompt.value.indexOf(text) === -1) {
            prompt.value = prompt.value.trim() ? prompt.value.trim() + ", " + text : text;
            fireInput(prompt);
        }
        switchToTxt2img();
    }

    function refreshLoraCards() {
        ["txt2img", "img2img"].forEach(function(tab) {
            var btn = app().querySelector("#" + tab + "_lora_extra_refresh_internal");
            if (btn) btn.dispatchEvent(new Event("click"));
        });
    }

    var lastSeen = null;

    function watch() {
        var button = app().querySelector("#lora_trainer_send_to_txt2img");
        if (button && !button.dataset.loraTrainerBound) {
            button.dataset.loraTrainerBound = "1";
            button.addEventListener("click", sendToTxt2img);
        }
        var text = sendText();
        if (lastSeen === null) {
            lastSeen = text;  // what was there at page load is no news
        } else if (text !== lastSeen) {
            lastSeen = text;
            if (text) refreshLoraCards();
        }
    }

    // Deep link: http://host:port/#lora_trainer opens the tab (bookmarks, docs, headless screenshots).
    function openTabFromHash() {
        if (window.location.hash !== "#lora_trainer") return true;
        var buttons = app().querySelectorAll("#tabs .tab-nav button, #tabs > div > button");
        for (var i = 0; i < buttons.length; i++) {
            if (buttons[i].textContent.trim() === "Train LoRA") {
                buttons[i].click();
                return true;
            }
        }
        return false;  // not rendered yet
    }

    function openTabSoon() {
        var tries = 0;
        var timer = setInterval(function() {
            if (openTabFromHash() || ++tries > 120) clearInterval(timer);
        }, 250);
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(openTabSoon);  // the WebUI's hook: fires once its tabs exist
    } else {
        window.addEventListener("load", openTabSoon);
    }

    window.loraTrainerSendToTxt2img = sendToTxt2img;  // for other scripts and tests
    window.loraTrainerRefreshLoraCards = refreshLoraCards;
    setInterval(watch, 1500);
})();
